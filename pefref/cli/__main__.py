from pefref.cli.app import app

app()
