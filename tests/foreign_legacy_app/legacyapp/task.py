"""legacyapp: the model, the data and the training loop (plain PyTorch)."""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

NUM_CLASSES = 3


class Net(nn.Module):
    """A small CNN for 1-channel 28x28 images."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.fc1 = nn.Linear(16 * 5 * 5, 32)
        self.fc2 = nn.Linear(32, NUM_CLASSES)

    def features(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x):
        return self.fc2(self.features(x))


def load_data(partition_id: int, num_partitions: int, batch_size: int):
    """This partition's own images: class-dependent blobs plus noise (seeded by partition)."""
    rng = np.random.default_rng(1000 + partition_id)
    n_train, n_val = 48 + 8 * partition_id, 24
    labels = rng.integers(0, NUM_CLASSES, n_train + n_val)
    yy, xx = np.mgrid[0:28, 0:28]
    centers = [(8, 8), (19, 19), (8, 19)]
    images = rng.normal(0.0, 0.6, (n_train + n_val, 1, 28, 28)).astype(np.float32)
    for i, y in enumerate(labels):
        cy, cx = centers[y]
        images[i, 0] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18.0).astype(np.float32) * 2.0
    x, y = torch.from_numpy(images), torch.from_numpy(labels).long()
    train = TensorDataset(x[:n_train], y[:n_train])
    val = TensorDataset(x[n_train:], y[n_train:])
    generator = torch.Generator().manual_seed(partition_id)
    trainloader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator)
    valloader = DataLoader(val, batch_size=batch_size)
    return trainloader, valloader


def train(net, trainloader, epochs, lr, device):
    """Train the model on the training set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for images, labels in trainloader:
            optimizer.zero_grad()
            loss = criterion(net(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def test(net, testloader, device):
    """Validate the model on the test set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    net.eval()
    with torch.no_grad():
        for images, labels in testloader:
            outputs = net(images.to(device))
            loss += criterion(outputs, labels.to(device)).item()
            correct += (torch.max(outputs.data, 1)[1] == labels.to(device)).sum().item()
    return loss / len(testloader), correct / len(testloader.dataset)


def get_weights(net):
    return [val.cpu().numpy() for _, val in net.state_dict().items()]


def set_weights(net, parameters):
    state_dict = {k: torch.tensor(v) for k, v in zip(net.state_dict().keys(), parameters)}
    net.load_state_dict(state_dict, strict=True)
