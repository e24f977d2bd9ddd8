"""What a user runs: the `spinfx` command line (cli), perplexity on real text (data, evaluate), report.html
(report_html), activation statistics of a rewrite (stats)."""
