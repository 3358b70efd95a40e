"""Empty message exchanges: what Flower itself costs per exchange on a deployment."""

import json
import time

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@client.query()
def answer(message: Message, context: Context) -> Message:
    return Message(RecordDict(), reply_to=message)


@server.main()
def main(grid: Grid, context: Context) -> None:
    want = int(context.run_config["nodes"])
    while len(nodes := list(grid.get_node_ids())) < want:
        time.sleep(0.1)
    walls = []
    for _ in range(int(context.run_config["exchanges"])):
        start = time.perf_counter()
        ids = set(grid.push_messages([Message(RecordDict(), dst_node_id=n, message_type="query")
                                      for n in nodes]))
        while ids:  # poll every 20 ms: the server side adds (almost) nothing
            ids -= {m.metadata.reply_to_message_id for m in grid.pull_messages(ids)}
            time.sleep(0.02)
        walls.append(time.perf_counter() - start)
    with open(context.run_config["out"], "w") as fh:
        json.dump({"exchange_s": walls}, fh)
