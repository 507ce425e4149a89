"""Reports: report text in three styles and its parser, one grounded reading of report text,
summaries and answers (LLM phrasing checked against the facts), and the Fig. 4 evaluation."""
