"""Shared pytest configuration: fixture plugins."""

pytest_plugins = ["tests.fixtures_stack", "tests.fixtures_guest", "tests.fixtures_libvirt"]
