"""The defaults, registered as named plugins exactly like third-party ones."""
