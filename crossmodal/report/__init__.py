"""Stage 4, report: figures and Markdown summaries of a reduced store and its steering runs."""
