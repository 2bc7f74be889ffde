"""Decisions: rank a phase's runs with their noise, promote the winner, write the report."""
