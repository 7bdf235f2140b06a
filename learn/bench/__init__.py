"""Benchmarks: each module is one `loopchat bench NAME` writing JSON and a PNG under results/."""
