"""The benchmark's FastAPI service: one JSON endpoint, bootstrapped by chatobs.setup() from the
environment. Run instrumented, or with OTEL_SDK_DISABLED=true as the uninstrumented baseline."""

from fastapi import FastAPI

import chatobs

app = FastAPI()
telemetry = chatobs.setup(service="gateway", app=app)


@app.get("/v1/ping/{item}")
async def ping(item: str) -> dict[str, str]:
    telemetry.traffic.message_in(role="user", source="api")
    return {"item": item}
