"""Helpers used only by the tests: ``browser_check`` (headless Chromium over the DevTools protocol)."""
