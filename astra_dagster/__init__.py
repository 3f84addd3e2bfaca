"""astra_dagster: SDSS-V Astra analyses as Dagster assets, with task lineage in PostgreSQL."""

__version__ = "0.1.0"
