"""Batch jobs: OpenAI's Files and Batches API, run on capacity interactive traffic leaves idle."""
