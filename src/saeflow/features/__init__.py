"""Features as evidence: the feature index (top activations, histograms), logit-lens labels,
its tables, explanations and dashboards."""
