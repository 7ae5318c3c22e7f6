"""The exchange format: retrieval runs moved in and out of a database as files (run_files.py) in
the authors' viewer format (viewer_format.py)."""
