"""NEMO search: GNN policies, evolutionary variation operators and the search engine."""
