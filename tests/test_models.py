import torch
from diffusers import UNet2DConditionModel

from ambiseg_diffusers import AmbiSegUNet
from ambiseg_diffusers.losses import ambiseg_loss

from conftest import LATENT_DIM, SIZE, TEXT_DIM, tiny_encoder, tiny_unet


def test_unet_is_a_unet2dcondition_with_image_and_mask_channels():
    unet = tiny_unet()
    assert isinstance(unet, UNet2DConditionModel)
    assert (unet.image_channels, unet.mask_channels, unet.latent_dim) == (1, 1, LATENT_DIM)
    x = torch.randn(2, 2, SIZE, SIZE)
    text = torch.randn(2, 5, TEXT_DIM)
    out = unet(x, torch.tensor([3, 50]), encoder_hidden_states=text, class_labels=torch.randn(2, LATENT_DIM)).sample
    assert out.shape == (2, 1, SIZE, SIZE)


def test_latent_changes_the_output_and_text_is_projected():
    unet = tiny_unet().eval()
    assert unet.encoder_hid_proj.in_features == TEXT_DIM and unet.encoder_hid_proj.out_features == 16
    x, t, text = torch.randn(1, 2, SIZE, SIZE), torch.tensor([10]), torch.randn(1, 4, TEXT_DIM)
    a = unet(x, t, encoder_hidden_states=text, class_labels=torch.zeros(1, LATENT_DIM)).sample
    b = unet(x, t, encoder_hidden_states=text, class_labels=torch.ones(1, LATENT_DIM)).sample
    assert not torch.allclose(a, b)


def test_presets_build_and_no_latent_ablation():
    unet = AmbiSegUNet.from_preset("cpu", latent_dim=0)
    assert unet.latent_dim == 0 and unet.class_embedding is None
    paper = AmbiSegUNet.from_preset("paper", sample_size=128, text_embed_dim=768)
    assert paper.config.block_out_channels[0] == 128 and paper.config.cross_attention_dim == 128
    # 64 channels per head at every attention level
    heads = paper.config.attention_head_dim
    assert all(c // h == 64 for c, h in zip(paper.config.block_out_channels, heads))


def test_one_step_trains_prior_and_posterior_and_lowers_kl():
    prior, posterior = tiny_encoder(1), tiny_encoder(2)
    # Start away from the zero-initialised heads so the KL is not already 0.
    torch.manual_seed(3)
    for head in (prior.head[-1], posterior.head[-1]):
        torch.nn.init.normal_(head.weight, std=0.5)
    image, mask = torch.randn(4, 1, SIZE, SIZE), torch.randn(4, 1, SIZE, SIZE).sign()
    text, text_mask = torch.randn(4, 6, TEXT_DIM), torch.ones(4, 6)
    before = {n: p.detach().clone() for n, p in [*prior.named_parameters(prefix="prior"), *posterior.named_parameters(prefix="post")]}
    optimizer = torch.optim.AdamW([*prior.parameters(), *posterior.parameters()], lr=1e-2)

    def loss_and_kl():
        q = posterior(torch.cat([image, mask], 1), text, text_mask)
        p = prior(image, text, text_mask)
        zeros = torch.zeros(4, 1, SIZE, SIZE)
        return ambiseg_loss(zeros, zeros, q, p, kl_weight=1e-3)

    loss, parts = loss_and_kl()
    loss.backward()
    optimizer.step()
    after = dict([*prior.named_parameters(prefix="prior"), *posterior.named_parameters(prefix="post")])
    assert not torch.equal(before["prior.head.2.weight"], after["prior.head.2.weight"])
    assert not torch.equal(before["post.head.2.weight"], after["post.head.2.weight"])
    assert not torch.equal(before["prior.conv.0.weight"], after["prior.conv.0.weight"])
    assert loss_and_kl()[1]["kl"] < parts["kl"]


def test_kl_of_identical_gaussians_is_zero():
    from ambiseg_diffusers import DiagonalGaussian

    g = DiagonalGaussian(torch.randn(3, 4), torch.randn(3, 4))
    assert torch.allclose(g.kl(g), torch.zeros(3))
    std_normal = DiagonalGaussian(torch.zeros(1, 1), torch.zeros(1, 1))
    shifted = DiagonalGaussian(torch.ones(1, 1), torch.zeros(1, 1))
    assert torch.allclose(shifted.kl(std_normal), torch.tensor([0.5]))
