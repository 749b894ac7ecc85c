"""Data-driven feature evolution (Balcells, Lerner et al. 2024): co-activation statistics
between adjacent layers, their tables, and the analyses built on them."""
