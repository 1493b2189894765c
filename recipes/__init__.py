"""rehead's built-in tuning recipes and accelerate configs (package data: ``rehead recipes`` lists them)."""
