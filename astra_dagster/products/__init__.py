"""What an astronomer takes away: summary tables and files, quality statistics and plots.

Pure code (psycopg, numpy, astropy, pyarrow, matplotlib; no Dagster): ``summary`` reads the
method tables into one row per source and spectrum and writes ``astraAllStar<Method>`` files,
``quality`` computes the checks' statistics, ``plots`` draws small PNGs for the UI.
"""
