"""Recipes shipped with dlm: ``dlm train quickstart`` finds ``quickstart.yaml`` here."""
