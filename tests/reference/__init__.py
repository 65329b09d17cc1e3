"""Original implementations vendored as test references (a second code path)."""
