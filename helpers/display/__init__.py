"""What the notebooks show: `nb` (a notebook's start-up and tables), `plots` (figures), `interactive` (widgets)."""
