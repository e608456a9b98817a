"""NTU RGB+D file-name parsing and the action -> catalog relation mapping."""
from pathlib import Path

import pytest

from dr_train.catalog import Relation, load_catalog
from dr_train.data.ntu import NTUName, is_ntu_name, ntu_relation, parse_ntu_name


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def test_parse_fields_and_video_id():
    name = parse_ntu_name("S001C002P003R002A058_rgb.avi")
    assert name == NTUName(setup=1, camera=2, performer=3, replication=2, action=58)
    assert name.video_id == "S001C002P003R002A058"
    big = parse_ntu_name("S032C003P106R001A120_rgb.avi")
    assert (big.setup, big.camera, big.performer, big.replication, big.action) == (32, 3, 106, 1, 120)


@pytest.mark.parametrize("name", ["S017C001P020R002A112_rgb.avi", "S017C001P020R002A112_rgb.mp4",
                                  "S017C001P020R002A112.avi", "S017C001P020R002A112",
                                  "/data/ntu/nturgb+d_rgb/S017C001P020R002A112_rgb.avi"])
def test_extension_and_suffix_variants_parse_alike(name):
    assert parse_ntu_name(name).video_id == "S017C001P020R002A112"
    assert parse_ntu_name(Path(name)).action == 112
    assert is_ntu_name(name)


@pytest.mark.parametrize("action, relation", [
    (50, "punching_slapping"), (51, "kicking"), (52, "pushing"), (53, "patting_on_back"), (54, "pointing_finger"),
    (55, "hugging"), (56, "giving_something"), (57, "touching_pocket"), (58, "handshaking"),
    (59, "walking_towards"), (60, "walking_apart"), (106, "hitting_with_object"), (107, "wielding_knife"),
    (108, "knocking_over"), (109, "grabbing_stuff"), (110, "shooting_with_gun"), (111, "stepping_on_foot"),
    (112, "high_five"), (113, "cheers_and_drink"), (114, "carrying_together"), (115, "taking_a_photo"),
    (116, "following"), (117, "whispering"), (118, "exchanging_things"), (119, "supporting_somebody"),
    (120, "rock_paper_scissors")])
def test_mutual_actions_map_to_their_catalog_relation(catalog, action, relation):
    found = ntu_relation(f"S001C001P001R001A{action:03d}_rgb.avi", catalog)
    assert found is not None and found.name == relation


@pytest.mark.parametrize("action", [1, 43, 49, 61, 105])
def test_single_person_actions_have_no_relation(catalog, action):
    assert ntu_relation(f"S001C001P001R001A{action:03d}_rgb.avi", catalog) is None


@pytest.mark.parametrize("name", ["S01C002P003R002A058_rgb.avi", "S001C002P003R002_rgb.avi", "video.mp4",
                                  "S001C002P003R002A058_depth.avi", "xS001C002P003R002A058_rgb.avi",
                                  "S001C002P003R002A121_rgb.avi", "S000C002P003R002A058_rgb.avi",
                                  "S001C004P003R002A058_rgb.avi", "S001C002P003R002A058_rgb.avi.part"])
def test_malformed_names_raise_naming_the_name(name):
    with pytest.raises(ValueError) as info:
        parse_ntu_name(f"/some/dir/{name}")
    assert f"/some/dir/{name}" in str(info.value)
    assert not is_ntu_name(name)


def test_catalog_actions_compare_as_integers():
    catalog = {"shake": Relation(name="shake", prompt="p", ntu_action="A058"),
               "solo": Relation(name="solo", prompt="p")}
    assert ntu_relation("S001C001P001R001A058_rgb.avi", catalog).name == "shake"
    clash = dict(catalog, again=Relation(name="again", prompt="p", ntu_action="A58"))
    with pytest.raises(ValueError, match="both claim NTU action A058"):
        ntu_relation("S001C001P001R001A058_rgb.avi", clash)
