"""The running side of the controller: resources, the stage loop, one Ray actor per rank, the run directory."""
