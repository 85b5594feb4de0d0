"""The report: leaderboard CSV, markdown tables and plots, rebuilt from run JSONs alone."""
