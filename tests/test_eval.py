"""Zero-shot metrics against hand-computed small cases."""
import pytest
import torch

from cosmos_fast.eval import class_embeddings, classification_accuracy, retrieval_recall


def test_retrieval_recall_hand_computed():
    # 3 images on the axes; 5 captions: image 0 has captions 0 and 1, image 1 caption 2, image 2 captions 3, 4
    images = torch.eye(3)
    texts = torch.tensor([[0.1, 1.0, 0.0],    # caption 0 (image 0) points at image 1: wrong
                          [0.9, 0.0, 0.5],    # caption 1 (image 0): right
                          [0.0, 0.2, 1.0],    # caption 2 (image 1) points at image 2: wrong
                          [0.0, 0.0, 1.0],    # caption 3 (image 2): right
                          [0.3, 0.0, 0.95]])  # caption 4 (image 2): right
    text_image = torch.tensor([0, 0, 1, 2, 2])
    m = retrieval_recall(images, texts, text_image, ks=(1, 2, 3), chunk=2)
    # image->text: image 0 ranks caption 1 first (found@1); image 1's best caption is 0, its caption 2 second
    # -> found@2; image 2's best is caption 3 -> found@1
    assert m["i2t_R@1"] == pytest.approx(200 / 3) and m["i2t_R@2"] == pytest.approx(100.0)
    # text->image: captions 1, 3, 4 find their image first; caption 0 ranks image 0 second; caption 2 ranks
    # image 1 second
    assert m["t2i_R@1"] == pytest.approx(60.0) and m["t2i_R@2"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match=r"text_image must have shape \[5\]"):
        retrieval_recall(images, texts, text_image[:4])


def test_classification_hand_computed():
    class_emb = torch.eye(3)
    images = torch.tensor([[1.0, 0.2, 0.1], [0.1, 0.2, 1.0], [0.6, 0.7, 0.0], [0.0, 0.4, 0.5]])
    labels = torch.tensor([0, 2, 0, 1])
    m = classification_accuracy(images, labels, class_emb, ks=(1, 2))
    assert m["top1"] == pytest.approx(50.0)  # images 0 and 1
    assert m["top2"] == pytest.approx(100.0)  # image 2: class 0 second; image 3: class 1 second


def test_class_embeddings_average_the_templates():
    vectors = {"a {}": torch.tensor([1.0, 0.0]), "b {}": torch.tensor([0.0, 2.0])}

    def encode(texts):
        return torch.stack([vectors[t.replace("cat", "{}")] for t in texts])

    emb = class_embeddings(encode, ["cat"], templates=("a {}", "b {}"))
    torch.testing.assert_close(emb, torch.tensor([[2 ** -0.5, 2 ** -0.5]]))


def test_top5_and_recall_at_5_hand_computed():
    # 7 classes; class embeddings on the axes, so an image's logits are its coordinates
    class_emb = torch.eye(7)
    images = torch.tensor([[7.0, 6, 5, 4, 3, 2, 1],    # label 0: ranked 1st
                           [7.0, 6, 5, 4, 3, 2, 1],    # label 4: 5th -> top5 only
                           [7.0, 6, 5, 4, 3, 2, 1],    # label 5: 6th -> neither
                           [1.0, 2, 3, 4, 5, 6, 7]])   # label 2: 5th -> top5 only
    m = classification_accuracy(images, torch.tensor([0, 4, 5, 2]), class_emb)
    assert m == pytest.approx({"top1": 25.0, "top5": 75.0})
    # the same ranks as retrieval: 4 images (the rows), one caption per class axis; caption j describes image
    # j // 2 (two captions each, the 7th caption image 3's third)
    m = retrieval_recall(images, class_emb, torch.tensor([0, 0, 1, 1, 2, 2, 3]), ks=(1, 5))
    # image->text: image 0 ranks caption 0 first; image 1 ranks caption 2 third; image 2 ranks caption 4 fifth;
    # image 3 ranks caption 6 first
    assert m["i2t_R@1"] == pytest.approx(50.0) and m["i2t_R@5"] == pytest.approx(100.0)


IMAGES, TEXTS, TEXT_IMAGE = torch.eye(3), torch.eye(3)[[0, 0, 1, 2]], torch.tensor([0, 0, 1, 2])
CLASSES, LABELS = torch.eye(3), torch.tensor([0, 2, 1])


@pytest.mark.parametrize("call,error,words", [
    # an image without captions used to count as found at rank 0 (argmax of an all-False row)
    (lambda: retrieval_recall(IMAGES, TEXTS[:2], TEXT_IMAGE[:2]), ValueError,
     "text_image gives no caption to 2 of the 3 images (first: image 1)"),
    (lambda: retrieval_recall(IMAGES, TEXTS, torch.tensor([0, 0, 1, 3])), ValueError,
     "text_image must hold image indexes in [0, 3), got values in [0, 3]"),
    (lambda: retrieval_recall(IMAGES, TEXTS, torch.tensor([0, 0, 1, -1])), ValueError, "image indexes in [0, 3)"),
    (lambda: retrieval_recall(IMAGES, TEXTS, TEXT_IMAGE.float()), TypeError, "text_image must be an integer tensor"),
    (lambda: retrieval_recall(IMAGES, TEXTS, TEXT_IMAGE.tolist()), TypeError, "text_image must be an integer tensor"),
    (lambda: retrieval_recall(IMAGES, TEXTS, TEXT_IMAGE[:, None]), ValueError, "text_image must have shape [4]"),
    (lambda: retrieval_recall(IMAGES, TEXTS[:, :2], TEXT_IMAGE), ValueError, "must have the same dimension D"),
    (lambda: retrieval_recall(IMAGES[0], TEXTS, TEXT_IMAGE), ValueError, "image_emb must have 2 dimensions"),
    (lambda: retrieval_recall(IMAGES, TEXTS, TEXT_IMAGE, ks=(0, 1)), ValueError, "ks must be a non-empty sequence"),
    (lambda: retrieval_recall(IMAGES, TEXTS, TEXT_IMAGE, ks=()), ValueError, "ks must be a non-empty sequence"),
    # labels [I, 1] broadcast against the top-k indexes; labels >= C counted as misses
    (lambda: classification_accuracy(IMAGES, LABELS[:, None], CLASSES), ValueError, "labels must have shape [3]"),
    (lambda: classification_accuracy(IMAGES, LABELS[:1], CLASSES), ValueError, "labels must have shape [3]"),
    (lambda: classification_accuracy(IMAGES, torch.tensor([0, 2, 3]), CLASSES), ValueError,
     "labels must hold class indexes in [0, 3)"),
    (lambda: classification_accuracy(IMAGES, LABELS, CLASSES, ks=(-1,)), ValueError, "ks must be"),
    (lambda: classification_accuracy(IMAGES, LABELS, CLASSES[:, :2]), ValueError, "same dimension D"),
    (lambda: class_embeddings(lambda t: torch.ones(len(t), 2), "cat"), TypeError,
     "class_names must be a non-empty list of strings"),
    (lambda: class_embeddings(lambda t: torch.ones(len(t), 2), ["cat", 3]), TypeError, "class_names must hold strings"),
    (lambda: class_embeddings(lambda t: torch.ones(len(t), 2), ["cat"], templates=("a photo",)), ValueError,
     "every template needs one {} for the class name"),
    (lambda: class_embeddings(lambda t: torch.ones(len(t), 2), ["cat"], templates=("{} and {}",)), ValueError,
     "every template needs one {} for the class name"),
])
def test_bad_input_names_the_argument(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)
