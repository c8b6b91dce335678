"""The fault suite: faults and bad input on the real stack, proven against Postgres."""
