"""What a stage tells its operator: step lines and progress (``progress``), each rank's log file (``ranklog``) and the
experiment trackers (``tracking``)."""
