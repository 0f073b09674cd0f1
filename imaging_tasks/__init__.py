"""Domain library for the imaging DAGs: plain Python, no Airflow, every step callable from the CLI."""
__version__ = "0.1.0"
