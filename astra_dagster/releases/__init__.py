"""Data releases: registering a release's sources and files from its manifest (``register``) and
planning the Dagster work a new release needs: partitions and range runs (``plan``)."""
