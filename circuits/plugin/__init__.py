"""The pytest plugin: hooks, session state, fixtures, declared hook specifications."""
