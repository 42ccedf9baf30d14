"""The data layer: the database in use, migrations, and every query the code runs."""
