"""Run configuration: the flat kebab-case run-config keys, parsed once into typed sections."""
