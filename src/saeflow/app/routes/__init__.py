"""The API's routes, one router per view: the run and its search (overview.py), feature pages
(features.py), flow graphs (flow.py), the data-driven statistics (evolution.py), the model
(steering.py) and the files and page (files.py). server.create_app includes them in this
order."""
