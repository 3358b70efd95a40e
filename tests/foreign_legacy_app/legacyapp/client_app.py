"""legacyapp: a Flower / PyTorch app (legacy NumPyClient)."""

import torch
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context

from legacyapp.task import Net, get_weights, load_data, set_weights, test, train


class FlowerClient(NumPyClient):
    def __init__(self, net, trainloader, valloader, local_epochs, partition_id):
        self.net = net
        self.trainloader = trainloader
        self.valloader = valloader
        self.local_epochs = local_epochs
        self.partition_id = partition_id

    def fit(self, parameters, config):
        set_weights(self.net, parameters)
        torch.manual_seed(100 * self.partition_id + config["server-round"])
        train_loss = train(self.net, self.trainloader, self.local_epochs, config["lr"], "cpu")
        return get_weights(self.net), len(self.trainloader.dataset), {"train_loss": train_loss}

    def evaluate(self, parameters, config):
        set_weights(self.net, parameters)
        loss, accuracy = test(self.net, self.valloader, "cpu")
        return loss, len(self.valloader.dataset), {"accuracy": accuracy}


def client_fn(context: Context):
    net = Net()
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    trainloader, valloader = load_data(partition_id, num_partitions, context.run_config["batch-size"])
    local_epochs = context.run_config["local-epochs"]
    return FlowerClient(net, trainloader, valloader, local_epochs, partition_id).to_client()


app = ClientApp(client_fn)
