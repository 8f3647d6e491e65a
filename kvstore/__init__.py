"""The store: layout, keys, container, tiers, policies and the ``TieredStore``."""
