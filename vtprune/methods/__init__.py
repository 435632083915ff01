"""The pruner registry's methods, one file each. Import ``vtprune.registry.METHODS`` to look them up."""
