"""NAS-Bench-201 (Dong & Yang, ICLR 2020): the cell space (`space`), its pricing (`pricing`) and benchmark tables
(`benchmark`)."""
