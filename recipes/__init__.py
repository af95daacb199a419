"""Recipes: real offline data, VAE, Transfusion training, the judge classifier, evaluation and the `transfusion` CLI."""
