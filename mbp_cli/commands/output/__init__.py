"""What the user sees: plain lines, a rich progress bar, the run's summary, the probe's answer."""
