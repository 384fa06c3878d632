"""``lopt plan``: the memory model of a step and the search for the fastest setting that fits a card."""
