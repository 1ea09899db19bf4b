"""Compiler passes: evaluate → resolve → expand → check (schema, edges, shapes) → report."""
