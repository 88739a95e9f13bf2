"""Lightning callbacks (only this package, src/lit and src/fit.py import Lightning)."""
