"""csm: Sesame's CSM-1B conversational speech model in plain PyTorch."""
