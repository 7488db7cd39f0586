"""A FastAPI app that knows nothing of chatobs: for the zero-code path."""

from fastapi import FastAPI

app = FastAPI()


@app.get("/hello")
def hello() -> dict[str, str]:
    return {"hello": "world"}
