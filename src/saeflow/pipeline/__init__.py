"""`saeflow run`: the stages of the main job and the report they write."""
