"""``kvcache serve``: the node's cache daemon (``docs/architecture.md``, "Daemon")."""
