"""The winning notebook, transcribed literally (shared/reference/winning-solution-README.txt): the oracle that
the parity tests and the benchmarks compare the workbench against.

Only what cannot be literal here is a parameter: the model and tokenizer objects (the real ones cannot be
downloaded), the device, and the DataLoader's num_workers. Do not "improve" this file: its value is that it is the
original code.
"""

import os

import torch
import torchvision.transforms as T
from natsort import natsorted
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import InterpolationMode, RandomAdjustSharpness
from tqdm import tqdm


def make_processor(sharpness):
    # processor_20 (EVA-CLIP) is make_processor(2), processor_23 (MetaCLIP) is make_processor(2.3)
    return T.Compose(
        [
            T.Resize((224, 224), interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(size=(224, 224)),
            T.Lambda(lambda img: img.convert('RGB')),
            RandomAdjustSharpness(sharpness, p=1),
            T.ToTensor(),
            T.Normalize(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
        ]
    )


def winner_prompts(class_names):
    prompts = []
    for class_name in class_names:
        prompts.append(f"{class_name}")
        prompts.append(f"a photo of a {class_name}")
        prompts.append(f"a image of a {class_name}")
        prompts.append(f"art of the {class_name}")
        prompts.append(f"a blurry photo of a {class_name}")
        prompts.append(f"a blurry image of a {class_name}")
        prompts.append(f"a blurred photo of a {class_name}")
        prompts.append(f"a blurred image of a {class_name}")
        prompts.extend([
            f'a bad photo of a {class_name}.',
            f'a photo of many {class_name}.',
            f'a photo of the hard to see {class_name}.',
            f'a low resolution photo of the {class_name}.',
            f'a bad photo of the {class_name}.',
            f'a cropped photo of the {class_name}.',
            f'a photo of a hard to see {class_name}.',
            f'a bright photo of a {class_name}.',
            f'a photo of a clean {class_name}.',
            f'a photo of a dirty {class_name}.',
            f'a dark photo of the {class_name}.',
            f'a photo of my {class_name}.',
            f'a photo of the cool {class_name}.',
            f'a bright photo of the {class_name}.',
            f'a cropped photo of a {class_name}.',
            f'a photo of the dirty {class_name}.',
            f'a jpeg corrupted photo of a {class_name}.',
            f'a blurry photo of the {class_name}.',
            f'a photo of the {class_name}.',
            f'a good photo of the {class_name}.',
            f'a rendering of the {class_name}.',
            f'a {class_name} in a video game.',
            f'a photo of one {class_name}.',
            f'a close-up photo of the {class_name}.',
            f'the {class_name} in a video game.',
            f'a sketch of a {class_name}.',
            f'a low resolution photo of a {class_name}.',
            f'a photo of the clean {class_name}.',
            f'a photo of a large {class_name}.',
            f'a photo of a nice {class_name}.',
            f'a photo of a weird {class_name}.',
            f'a sketch of the {class_name}.',
            f'a jpeg corrupted photo of the {class_name}.',
            f'a good photo of a {class_name}.',
            f'a photo of the nice {class_name}.',
            f'a photo of the small {class_name}.',
            f'a photo of the weird {class_name}.',
            f'a drawing of the {class_name}.',
            f'a photo of the large {class_name}.',
            f'a dark photo of a {class_name}.',
            f'a photo of a small {class_name}.'
        ])

        if class_name == "Buildings":
            prompts.extend([
                "A picture of an urban area with buildings",
                "An architectural structure in the city",
                "The Windows"
            ])
        elif class_name == "Forests":
            prompts.extend([
                "A picture of a dense forest with trees",
                "A scenic view of a forest landscape",
                "A picture of the Trees"
            ])
        elif class_name == "Glacier":
            prompts.extend([
                "A picture of an ice",
                "A scenic view of a snowy glacier",
                "A scenic view of some snow in the mountains"
            ])
        elif class_name == "Mountains":
            prompts.extend([
                "A picture of a mountain range",
                "A scenic view of the mountains",
                "A stunning panorama of rugged mountain cliffs"
            ])
        elif class_name == "Sea":
            prompts.extend([
                "A picture of water",
                "A picture of the ocean",
                "A scenic view of the sea and waves"
            ])
        elif class_name == "Street":
            prompts.extend([
                "A picture of a road",
                "A picture of a busy street in the city",
                "An urban street with buildings and cars"
            ])
    return prompts


def open_clip_probs(model, tokenizer, prompts, root, dataset_name, processor, device='cpu', num_workers=2):
    """The MetaCLIP cell: per-image probability vectors over all prompts."""
    ds_meta = ImageFolder(os.path.join(root, dataset_name), transform=processor)
    ds_meta.samples = natsorted(ds_meta.samples)
    dl_meta = DataLoader(ds_meta, shuffle=False, batch_size=32, num_workers=num_workers)

    meta_probs_list = []

    with torch.no_grad(), torch.cuda.amp.autocast():
        text = tokenizer.tokenize(prompts).to(device)
        text_features = model.encode_text(text)
        text_features /= text_features.norm(dim=-1, keepdim=True)

        for x, y in tqdm(dl_meta):
            x = x.to(device)
            image_features = model.encode_image(x)
            image_features /= image_features.norm(dim=-1, keepdim=True)

            zero_shot_probs = (100.0 * image_features @ text_features.T).softmax(dim=-1)
            meta_probs_list += zero_shot_probs
    return meta_probs_list


def eva_clip_probs(model, tokenizer, prompts, root, dataset_name, processor, device='cpu', num_workers=2):
    """The EVA-CLIP cell: a transformers tokenizer called with padding=True, then encode_text/encode_image."""
    ds_eva = ImageFolder(os.path.join(root, dataset_name), transform=processor)
    ds_eva.samples = natsorted(ds_eva.samples)
    dl_eva = DataLoader(ds_eva, shuffle=False, batch_size=32, num_workers=num_workers)

    eva_probs_list = []

    with torch.no_grad(), torch.cuda.amp.autocast():
        text = tokenizer(prompts, return_tensors='pt', padding=True).input_ids.to(device)
        text_features = model.encode_text(text)
        text_features /= text_features.norm(dim=-1, keepdim=True)

        for x, y in tqdm(dl_eva):
            x = x.to(device)
            image_features = model.encode_image(x)
            image_features /= image_features.norm(dim=-1, keepdim=True)

            zero_shot_probs = (100.0 * image_features @ text_features.T).softmax(dim=-1)
            eva_probs_list += zero_shot_probs
    return eva_probs_list


def ensemble_labels(meta_probs_list, eva_probs_list, class_names, meta_weight=0.5, eva_weight=0.5, drop=False):
    """The ensemble cell, with the optional drop of probabilities <= 0.002 applied before the labels."""
    ensembled_probs_list = [meta_probs * meta_weight + eva_probs * eva_weight
                            for meta_probs, eva_probs in zip(meta_probs_list, eva_probs_list)]
    if drop:
        ensembled_probs_list = [torch.where(ensembled_probs > 0.002, ensembled_probs, 0)
                                for ensembled_probs in ensembled_probs_list]
    label_list = [ensembled_probs.reshape(len(class_names), -1).mean(dim=-1).max(dim=-1)[1].tolist()
                  for ensembled_probs in ensembled_probs_list]
    return label_list
