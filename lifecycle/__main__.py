from lifecycle.cli import app

app()
