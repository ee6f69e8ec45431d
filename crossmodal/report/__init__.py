"""Stage 4, report: figures and Markdown summaries of a reduced store and its steering runs.

``store_report.write_store_report`` writes the whole report of a store; it calls
``selection.write_report`` (exact sets, overlap, Spearman, v1 tables) and
``steering.steering_figures`` (target-language share of each steering run).
"""
