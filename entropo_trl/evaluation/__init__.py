"""Test-time scaling and its measurement: the hybrid best-of-N selector (`selection`), pass@k, best-of-N and diversity
(`metrics`), SWE-bench predictions and the official harness (`swebench`), the report (`report`) and the
`entropo select|report|swebench` commands (`cli`)."""
