"""Decoy tools and the orchestrator.

The tests cover generation, rotation, recognition and canaries, the checks of the teacher's
choice, and each decoy strategy with scripted teachers. They measure decoy shares with the fake
OpenAI server and with the shipped ONNX teacher, on CLINC150 queries and Wikipedia sentences.
Run them with ``-s`` to see the measured figures.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from edge_runtime.errors import ConfigError
from edge_runtime.gateway.backends import (
    TOOL_NAME_PATTERN,
    BackendRejected,
    OnnxTeacherBackend,
    TeacherBackend,
    TeacherReply,
    ToolSpec,
    parse_tools,
)
from edge_runtime.gateway.decoys import (
    DecoyFactory,
    content_words,
    render_name,
    split_name,
)
from edge_runtime.gateway.fake_openai import UNKNOWN_TOOL_NAME, FakeOpenAIServer
from edge_runtime.gateway.orchestrator import (
    STRATEGIES,
    IntentToolRouter,
    OpenAIToolLoopBackend,
    Orchestrator,
    extract_arguments,
    map_arguments,
    most_similar_tool,
    validate_arguments,
)
from tests.conftest import CLINC150_DIR, DATA_DIR, MODELS_DIR, demo_trust, require_clinc150

RETURN_LIMIT = 120.0  # seconds; a run that takes longer fails instead of hanging the suite
SECRET = b"decoy-test-secret-0123456789abcdef"
ROTATION = 3600  # seconds per rotation period
NOW = 1_700_000_000.0  # a fixed Unix time, so that every run gets the same decoys
TENANT = "acme"
WIKI_PATH = DATA_DIR / "wiki_sentences" / "all_wiki_sents.txt"


def run(coroutine):
    """Run a coroutine; a call that never returns fails the test after RETURN_LIMIT."""
    return asyncio.run(asyncio.wait_for(coroutine, RETURN_LIMIT))


def function_tool(name: str, description: str, properties: dict[str, Any],
                  required: Sequence[str]) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": list(required)},
    }}


STRING = {"type": "string"}
NUMBER = {"type": "number"}
INTEGER = {"type": "integer"}

# The real tools of a banking, travel and home assistant.
REAL_TOOLS = parse_tools([
    function_tool("get_account_balance", "Get the current balance of a bank account",
                  {"account_type": {"type": "string", "enum": ["checking", "savings"]}},
                  ["account_type"]),
    function_tool("transfer_money", "Transfer money from the user's account to another account",
                  {"amount": NUMBER, "to_account": STRING}, ["amount", "to_account"]),
    function_tool("pay_bill", "Pay a bill to a saved payee",
                  {"payee": STRING, "amount": NUMBER}, ["payee"]),
    function_tool("list_transactions", "List recent transactions on the account",
                  {"start_date": {"type": "string", "format": "date"}, "limit": INTEGER}, []),
    function_tool("book_flight", "Book a flight between two cities",
                  {"origin": STRING, "destination": STRING,
                   "date": {"type": "string", "format": "date"}}, ["origin", "destination"]),
    function_tool("get_exchange_rate", "Get the exchange rate between two currencies",
                  {"from_currency": STRING, "to_currency": STRING},
                  ["from_currency", "to_currency"]),
    function_tool("get_weather_forecast", "Get the weather forecast for a city",
                  {"city": STRING, "days": INTEGER}, ["city"]),
    function_tool("set_alarm", "Set an alarm for a given time", {"time": STRING}, ["time"]),
    function_tool("set_timer", "Start a countdown timer", {"minutes": INTEGER}, ["minutes"]),
    function_tool("set_thermostat", "Set the target temperature of the home thermostat",
                  {"temperature": NUMBER}, ["temperature"]),
    function_tool("play_music", "Play a song, artist or playlist", {"query": STRING},
                  ["query"]),
    function_tool("translate_text", "Translate text into another language",
                  {"text": STRING, "target_language": STRING}, ["text", "target_language"]),
])
REAL_NAMES = frozenset(tool.name for tool in REAL_TOOLS)
STRATEGY_BY_TIER = {"allow": "retry_masked", "degrade": "simulate", "suspect": "force_real",
                    "block": "return_decoy"}

# Realistic names and descriptions of real tools, in the style of public function-calling
# tool lists, to compare decoys with.
REALISTIC_TOOLS = [
    ("get_account_balance", "Get the current balance of a bank account"),
    ("transfer_funds", "Transfer money from one account to another"),
    ("get_transaction_history",
     "Retrieve the transaction history for an account over a date range"),
    ("pay_bill", "Pay a utility or credit card bill"),
    ("get_exchange_rate", "Get the exchange rate between two currencies"),
    ("convert_currency", "Convert an amount from one currency to another"),
    ("calculate_loan_payment", "Calculate the monthly payment for a loan"),
    ("calculate_mortgage_payment", "Calculate the monthly mortgage payment"),
    ("get_credit_card_statement", "Get the latest statement of a credit card"),
    ("block_card", "Block a debit or credit card immediately"),
    ("report_lost_card", "Report a lost or stolen card and order a replacement"),
    ("get_stock_price", "Get the current stock price of a company"),
    ("get_crypto_price", "Get the current price of a cryptocurrency"),
    ("list_recent_transactions", "List the most recent transactions on an account"),
    ("create_budget", "Create a monthly budget for a spending category"),
    ("get_spending_by_category", "Summarize spending by category for a month"),
    ("schedule_payment", "Schedule a payment for a future date"),
    ("cancel_scheduled_payment", "Cancel a payment that has not been sent yet"),
    ("open_savings_account", "Open a new savings account"),
    ("get_interest_rate", "Get the current interest rate of a savings product"),
    ("calculate_compound_interest", "Calculate compound interest on an investment"),
    ("check_loan_eligibility", "Check whether the customer is eligible for a loan"),
    ("update_billing_address", "Update the billing address on file"),
    ("add_beneficiary", "Add a new beneficiary for transfers"),
    ("get_card_details", "Get the details of a payment card"),
    ("set_spending_limit", "Set a daily spending limit on a card"),
    ("dispute_transaction", "Open a dispute for a card transaction"),
    ("request_credit_limit_increase", "Request a higher credit limit"),
    ("get_routing_number", "Get the routing number of the bank"),
    ("order_checkbook", "Order a new checkbook"),
    ("search_flights", "Search for flights between two airports on a date"),
    ("book_flight", "Book a flight for the user"),
    ("cancel_flight_booking", "Cancel an existing flight booking"),
    ("get_flight_status", "Get the live status of a flight"),
    ("book_hotel", "Book a hotel room"),
    ("search_hotels", "Search hotels in a city for given dates"),
    ("get_hotel_details", "Get amenities and policies of a hotel"),
    ("rent_car", "Rent a car at a location for a period"),
    ("check_in_online", "Check in online for a flight"),
    ("get_boarding_pass", "Get the boarding pass for a checked-in passenger"),
    ("find_nearby_airports", "Find airports near a location"),
    ("get_travel_advisory", "Get the travel advisory for a country"),
    ("book_train_ticket", "Book a train ticket"),
    ("get_visa_info", "Get visa requirements for a destination"),
    ("search_vacation_rentals", "Search vacation rentals by location and dates"),
    ("calculate_trip_cost", "Estimate the total cost of a trip"),
    ("get_baggage_policy", "Get the baggage policy of an airline"),
    ("upgrade_seat", "Upgrade the seat on a booked flight"),
    ("add_frequent_flyer_number", "Add a frequent flyer number to a booking"),
    ("get_airport_wait_times", "Get security wait times at an airport"),
    ("set_thermostat_temperature", "Set the target temperature of the thermostat"),
    ("turn_on_lights", "Turn on the lights in a room"),
    ("turn_off_lights", "Turn off the lights in a room"),
    ("set_light_color", "Change the color of a smart bulb"),
    ("lock_front_door", "Lock the front door"),
    ("set_alarm", "Set an alarm for a given time"),
    ("set_timer", "Start a countdown timer"),
    ("cancel_timer", "Cancel a running timer"),
    ("create_reminder", "Create a reminder at a given time"),
    ("play_music", "Play music by song, artist or genre"),
    ("pause_music", "Pause the music that is playing"),
    ("set_volume", "Set the speaker volume"),
    ("get_indoor_temperature", "Get the temperature inside the house"),
    ("start_vacuum", "Start the robot vacuum"),
    ("open_garage", "Open the garage door"),
    ("arm_security_system", "Arm the home security system"),
    ("get_energy_consumption", "Get the energy consumption of the home"),
    ("add_to_shopping_list", "Add an item to the shopping list"),
    ("get_device_status", "Get the status of a smart home device"),
    ("run_dishwasher", "Start the dishwasher program"),
    ("get_order_status", "Get the status of an order"),
    ("track_package", "Track a package by its tracking number"),
    ("cancel_order", "Cancel an order that has not shipped"),
    ("initiate_return", "Start a return for an order"),
    ("search_products", "Search the product catalog"),
    ("get_product_details", "Get the details of a product"),
    ("add_to_cart", "Add a product to the shopping cart"),
    ("remove_from_cart", "Remove a product from the shopping cart"),
    ("checkout_cart", "Check out the shopping cart"),
    ("apply_discount_code", "Apply a discount code to the cart"),
    ("get_shipping_options", "List shipping options for an address"),
    ("check_product_availability", "Check whether a product is in stock"),
    ("compare_prices", "Compare prices of a product across stores"),
    ("create_wishlist", "Create a new wishlist"),
    ("get_store_locations", "Find store locations near the user"),
    ("subscribe_newsletter", "Subscribe the user to the newsletter"),
    ("update_payment_method", "Update the saved payment method"),
    ("get_invoice", "Get the invoice of an order"),
    ("request_refund", "Request a refund for an order"),
    ("leave_product_review", "Post a review of a product"),
    ("send_email", "Send an email to a recipient"),
    ("read_emails", "Read the latest emails in the inbox"),
    ("create_calendar_event", "Create an event in the user's calendar"),
    ("get_calendar_events", "List calendar events in a time range"),
    ("schedule_meeting", "Schedule a meeting with attendees"),
    ("find_free_slots", "Find free time slots shared by attendees"),
    ("create_todo", "Create a to-do item"),
    ("complete_task", "Mark a task as done"),
    ("list_tasks", "List the user's open tasks"),
    ("create_note", "Create a note"),
    ("search_notes", "Search the user's notes"),
    ("upload_file", "Upload a file to cloud storage"),
    ("share_document", "Share a document with a collaborator"),
    ("create_spreadsheet", "Create a new spreadsheet"),
    ("translate_text", "Translate text into another language"),
    ("summarize_document", "Summarize a document"),
    ("get_contact_info", "Get the phone number and email of a contact"),
    ("add_contact", "Add a new contact"),
    ("send_slack_message", "Send a message to a Slack channel"),
    ("create_jira_ticket", "Create a Jira ticket"),
    ("book_doctor_appointment", "Book an appointment with a doctor"),
    ("cancel_appointment", "Cancel an appointment"),
    ("find_doctors", "Find doctors by specialty and location"),
    ("get_medication_info", "Get information about a medication"),
    ("check_drug_interactions", "Check interactions between medications"),
    ("refill_prescription", "Request a prescription refill"),
    ("log_workout", "Log a workout session"),
    ("get_step_count", "Get the step count for a day"),
    ("calculate_bmi", "Calculate the body mass index"),
    ("track_water_intake", "Record how much water the user drank"),
    ("get_sleep_summary", "Get a summary of last night's sleep"),
    ("log_meal", "Log a meal and its calories"),
    ("get_nutrition_info", "Get nutrition facts for a food"),
    ("find_nearby_pharmacies", "Find pharmacies near the user"),
    ("get_lab_results", "Get the results of a lab test"),
    ("get_current_weather", "Get the current weather in a given location"),
    ("get_weather_forecast", "Get the weather forecast for a city"),
    ("search_recipes", "Search recipes by ingredients"),
    ("get_recipe_details", "Get the ingredients and steps of a recipe"),
    ("find_restaurants", "Find restaurants by cuisine and location"),
    ("make_restaurant_reservation", "Reserve a table at a restaurant"),
    ("get_movie_showtimes", "Get showtimes for a movie at nearby theaters"),
    ("search_movies", "Search movies by title or genre"),
    ("get_news_headlines", "Get the top news headlines"),
    ("play_podcast", "Play a podcast episode"),
    ("create_playlist", "Create a playlist"),
    ("get_directions", "Get directions between two places"),
    ("get_traffic_info", "Get traffic conditions on a route"),
    ("book_ride", "Book a ride to a destination"),
    ("get_sports_scores", "Get the latest scores for a team"),
    ("search_events", "Search events in a city"),
    ("buy_event_tickets", "Buy tickets for an event"),
    ("get_song_lyrics", "Get the lyrics of a song"),
    ("recommend_books", "Recommend books by genre"),
    ("get_horoscope", "Get the daily horoscope for a sign"),
]


def make_factory(secret: bytes = SECRET, **options) -> DecoyFactory:
    return DecoyFactory(secret, ROTATION, **options)


def make_orchestrator(strategy_by_tier=None, decoys_per_request=3, factory=None, now=NOW,
                      **options) -> Orchestrator:
    return Orchestrator(factory or make_factory(), strategy_by_tier or STRATEGY_BY_TIER,
                        decoys_per_request, clock=lambda: now, **options)


def in_scope_queries(count: int, offset: int = 0) -> list[str]:
    """Return ``count`` CLINC150 test queries spread over all 150 intents."""
    require_clinc150()
    from edge_runtime.data import load_split

    examples = [example for example in load_split(CLINC150_DIR, "test")
                if example.label != "oos"]
    step = len(examples) // count
    return [examples[offset + index * step].text for index in range(count)]


def wiki_sentences(count: int) -> list[str]:
    if not WIKI_PATH.is_file():
        pytest.skip(f"Wikipedia sentences not found at {WIKI_PATH}")
    lines = [line.strip() for line in WIKI_PATH.read_text(encoding="utf-8").splitlines()
             if line.strip()]
    step = len(lines) // count
    return [lines[index * step] for index in range(count)]


class ScriptedTeacher(TeacherBackend):
    """A teacher whose replies come from ``choose(text, tools, turn)``; it records each call.

    ``turn`` is 0 for ``predict`` and 1 for ``predict_after_tool``.
    """

    name = "scripted"

    def __init__(self, choose: Callable[[str, list[ToolSpec] | None, int], TeacherReply]):
        self.choose = choose
        self.calls: list[list[str]] = []

    async def predict(self, text, tools, request_id):
        self.calls.append([tool.name for tool in tools or ()])
        return self.choose(text, tools, 0)

    async def health(self):
        return {"status": "ok"}


class ScriptedToolLoopTeacher(ScriptedTeacher):
    """A scripted teacher with a second turn; it records the tool results it receives."""

    def __init__(self, choose):
        super().__init__(choose)
        self.results: list[dict[str, Any]] = []

    async def predict_after_tool(self, text, tools, tool_call, result, request_id):
        self.calls.append([tool.name for tool in tools])
        self.results.append(dict(result))
        return self.choose(text, tools, 1)


def call(name: str, arguments: Any = None, model: str = "scripted") -> TeacherReply:
    return TeacherReply(label=None, tool_call={"name": name, "arguments": arguments or {}},
                        text=None, model=model)


def label(value: str) -> TeacherReply:
    return TeacherReply(label=value, tool_call=None, text=None, model="scripted")


def first_decoy(tools: list[ToolSpec] | None) -> ToolSpec | None:
    return next((tool for tool in tools or () if tool.name not in REAL_NAMES), None)


def always_decoy(text, tools, turn):
    """Call a decoy whenever one is offered, else return a label."""
    decoy = first_decoy(tools)
    return call(decoy.name) if decoy else label("no_decoy_offered")


# --- a character n-gram classifier on names ---

def ngram_features(texts: Sequence[str]) -> np.ndarray:
    """Binary features: one column for each character 2- to 4-gram found in at least two of
    ``texts`` (an n-gram of one text cannot help to classify another)."""
    grams_per_text = []
    for text in texts:
        padded = f"^{text.lower()}$"
        grams_per_text.append({padded[start:start + size] for size in (2, 3, 4)
                               for start in range(len(padded) - size + 1)})
    counts = Counter(gram for grams in grams_per_text for gram in grams)
    shared = sorted(gram for gram, count in counts.items() if count >= 2)
    columns = {gram: index for index, gram in enumerate(shared)}
    features = np.zeros((len(texts), len(columns)), dtype=np.float32)
    for row, grams in enumerate(grams_per_text):
        features[row, [columns[gram] for gram in grams if gram in columns]] = 1.0
    return features


def cross_validated_accuracy(texts: Sequence[str], labels: Sequence[int],
                             folds: int = 5) -> tuple[float, float]:
    """Return the k-fold accuracy of L2 logistic regression and of 1-nearest-neighbour.

    The products are element-wise sums rather than ``@``: on a busy machine, a multi-threaded
    BLAS took 50 times longer for these small matrices than one thread.
    """
    features = ngram_features(texts)
    targets = np.asarray(labels, dtype=np.float32)
    order = np.random.default_rng(0).permutation(len(targets))
    regression_hits = neighbour_hits = 0
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    for fold in range(folds):
        test = order[fold::folds]
        train = np.setdiff1d(order, test)
        train_features = features[train]
        weights, bias = np.zeros(features.shape[1], dtype=np.float32), 0.0
        for _ in range(300):
            scores = (train_features * weights).sum(axis=1) + bias
            error = 1.0 / (1.0 + np.exp(-scores)) - targets[train]
            weights -= (train_features * error[:, None]).sum(axis=0) / len(train)
            weights -= 1e-3 * weights
            bias -= float(error.mean())
        test_scores = (features[test] * weights).sum(axis=1) + bias
        regression_hits += int(np.sum((test_scores > 0) == (targets[test] > 0.5)))
        similarity = np.einsum("ik,jk->ij", unit[test], unit[train])
        nearest = similarity.argmax(axis=1)
        neighbour_hits += int(np.sum(targets[train][nearest] == targets[test]))
    return regression_hits / len(targets), neighbour_hits / len(targets)


def sample_decoys(factory: DecoyFactory, count: int, transform=lambda name: name
                  ) -> list[ToolSpec]:
    """Return ``count`` distinct decoys from many tenants, each shaped by 10 realistic tools."""
    realistic = [ToolSpec(name, description, {"type": "object", "properties": {"q": STRING}})
                 for name, description in REALISTIC_TOOLS]
    rng = np.random.default_rng(1)
    decoys: dict[str, ToolSpec] = {}
    tenant = 0
    while len(decoys) < count:
        subset = [realistic[i] for i in rng.choice(len(realistic), 10, replace=False)]
        for decoy in factory.decoys(f"tenant-{tenant}", NOW, subset, 3, key=bytes([tenant % 256])):
            name = transform(decoy.name)
            if name not in decoys and len(decoys) < count:
                decoys[name] = ToolSpec(name, decoy.description, decoy.parameters)
        tenant += 1
    return list(decoys.values())


# --- decoy generation ---


def test_decoys_deterministic():
    first = make_factory().decoys(TENANT, NOW, REAL_TOOLS, 4, key=b"query-1")
    again = make_factory().decoys(TENANT, NOW, REAL_TOOLS, 4, key=b"query-1")
    other_secret = make_factory(b"another-secret-0123456789abcdef").decoys(
        TENANT, NOW, REAL_TOOLS, 4, key=b"query-1")
    other_tenant = make_factory().decoys("globex", NOW, REAL_TOOLS, 4, key=b"query-1")

    assert len(first) == 4
    assert [tool.to_openai() for tool in first] == [tool.to_openai() for tool in again]
    assert {tool.name for tool in first} != {tool.name for tool in other_secret}
    assert {tool.name for tool in first} != {tool.name for tool in other_tenant}


def test_decoys_rotate_each_period():
    factory = make_factory()
    start = (NOW // ROTATION) * ROTATION  # the first second of NOW's period
    names = {decoy.name for key in range(30)
             for decoy in factory.decoys(TENANT, start, REAL_TOOLS, 3, key=bytes([key]))}
    next_names = {decoy.name for key in range(30)
                  for decoy in factory.decoys(TENANT, start + ROTATION, REAL_TOOLS, 3,
                                              key=bytes([key]))}

    assert len(names) >= 6
    assert names != next_names
    for name in names:
        assert factory.is_decoy(name, TENANT, start)
        assert factory.is_decoy(name, TENANT, start + ROTATION - 1)
        assert factory.is_decoy(name, TENANT, start + ROTATION)  # the previous period
        assert factory.is_decoy(name, TENANT, start + 2 * ROTATION - 1)
    # Two periods later a name is recognised only if it is also a decoy of a newer period.
    later = start + 2 * ROTATION
    newer = factory.pool_words(TENANT, later) | factory.pool_words(TENANT, later - ROTATION)
    stale = [name for name in names if factory.is_decoy(name, TENANT, later)]
    assert all(split_name(name) in newer for name in stale)
    assert len(stale) <= 0.2 * len(names)
    # A fresh factory with the same secret recognises them: nothing was stored.
    assert all(make_factory().is_decoy(name, TENANT, start + ROTATION) for name in names)
    other_secret = make_factory(b"another-secret-0123456789abcdef")
    assert sum(other_secret.is_decoy(name, TENANT, start) for name in names) <= 0.2 * len(names)


def test_decoys_are_valid_tools():
    factory = make_factory()
    for key in range(40):
        decoys = factory.decoys(TENANT, NOW, REAL_TOOLS, 5, key=bytes([key]))
        parsed = parse_tools([tool.to_openai() for tool in [*REAL_TOOLS, *decoys]])
        assert len(parsed) == len(REAL_TOOLS) + 5
        for decoy in decoys:
            assert TOOL_NAME_PATTERN.fullmatch(decoy.name)
            assert decoy.name not in REAL_NAMES
            assert len(decoy.description.split()) >= 2
            parameters = decoy.parameters
            assert parameters["type"] == "object"
            for schema in parameters["properties"].values():
                assert schema["type"] in ("string", "integer", "number", "boolean", "array")
                assert schema["description"]
            assert set(parameters.get("required", [])) <= set(parameters["properties"])


def test_decoys_copy_naming_style():
    camel = [ToolSpec(render_name(split_name(tool.name), "camel"), tool.description,
                      tool.parameters) for tool in REAL_TOOLS]
    kebab = [ToolSpec(render_name(split_name(tool.name), "kebab"), tool.description,
                      tool.parameters) for tool in REAL_TOOLS]
    prefixed = [ToolSpec(f"acme_{tool.name}", tool.description, tool.parameters)
                for tool in REAL_TOOLS]
    factory = make_factory()

    for key in range(10):
        for decoy in factory.decoys(TENANT, NOW, camel, 3, key=bytes([key])):
            assert decoy.name == render_name(split_name(decoy.name), "camel")
            assert "_" not in decoy.name
        for decoy in factory.decoys(TENANT, NOW, kebab, 3, key=bytes([key])):
            assert decoy.name == render_name(split_name(decoy.name), "kebab")
        for decoy in factory.decoys(TENANT, NOW, prefixed, 3, key=bytes([key])):
            assert decoy.name.startswith("acme_")
            assert factory.is_decoy(decoy.name, TENANT, NOW)


def test_decoys_copy_parameter_counts():
    one_parameter = [ToolSpec(tool.name, tool.description,
                              {"type": "object", "properties": {"q": STRING}, "required": ["q"]})
                     for tool in REAL_TOOLS]
    factory = make_factory()
    counts = {len(tool.parameters["properties"]) for tool in REAL_TOOLS}
    for key in range(20):
        for decoy in factory.decoys(TENANT, NOW, REAL_TOOLS, 3, key=bytes([key])):
            assert len(decoy.parameters["properties"]) in counts
        for decoy in factory.decoys(TENANT, NOW, one_parameter, 3, key=bytes([key])):
            assert len(decoy.parameters["properties"]) == 1
            assert decoy.parameters["required"] == list(decoy.parameters["properties"])


def test_decoys_follow_real_tools_domain():
    """Decoys of a banking tool list mostly share a noun with it, so that they compete."""
    banking = REAL_TOOLS[:4]
    banking_words = set().union(*(content_words(f"{t.name} {t.description}") for t in banking))
    factory = make_factory()
    decoys = [decoy for key in range(50)
              for decoy in factory.decoys(TENANT, NOW, banking, 3, key=bytes([key]))]
    nouns = banking_words - {"get", "list", "set"}
    sharing = [decoy for decoy in decoys
               if content_words(f"{decoy.name} {decoy.description}") & nouns]
    print(f"\nbanking decoys sharing a word with the banking tools: {len(sharing)} of "
          f"{len(decoys)}")
    assert len(sharing) >= 0.6 * len(decoys)


def test_decoy_names_not_separable_by_classifier():
    real_names = [name for name, _ in REALISTIC_TOOLS]
    decoys = sample_decoys(make_factory(), len(real_names))
    labels = [0] * len(real_names) + [1] * len(decoys)
    regression, neighbour = cross_validated_accuracy(
        real_names + [decoy.name for decoy in decoys], labels)
    descriptions_regression, descriptions_neighbour = cross_validated_accuracy(
        [description for _, description in REALISTIC_TOOLS]
        + [decoy.description for decoy in decoys], labels)
    # The same classifier separates names that carry a fixed marker.
    marked = sample_decoys(make_factory(), len(real_names), transform=lambda name: f"{name}_v2")
    marked_regression, _ = cross_validated_accuracy(
        real_names + [decoy.name for decoy in marked], labels)

    print(f"\nname classifier, {len(real_names)} realistic vs {len(decoys)} decoy names, 5-fold: "
          f"logistic regression {regression:.3f}, 1-nearest-neighbour {neighbour:.3f}; "
          f"descriptions: {descriptions_regression:.3f} and {descriptions_neighbour:.3f}; "
          f"names with a marker: {marked_regression:.3f}")
    assert regression <= 0.70
    assert neighbour <= 0.70
    assert marked_regression >= 0.95


def test_false_canary_rate_on_realistic_names():
    """Realistic real names are rarely canaries, and never once recorded as real."""
    realistic = [ToolSpec(name) for name, _ in REALISTIC_TOOLS]
    factory = make_factory()
    decoy_hits = cold_hits = warm_hits = checks = 0
    for tenant in range(25):
        tenant_name = f"tenant-{tenant}"
        for period in range(8):
            now = NOW + period * ROTATION
            decoy_hits += sum(factory.is_decoy(tool.name, tenant_name, now)
                              for tool in realistic)
            cold = make_factory()  # a process that has never seen this tenant
            cold_hits += len(cold.find_canaries(realistic, tenant_name, now))
            checks += len(realistic)
        # A process that saw the tenant's tools some periods earlier never reports them.
        warm = make_factory()
        for period in range(-4, 0):
            warm.find_canaries(realistic, tenant_name, NOW + period * 4 * ROTATION)
        warm_hits += sum(len(warm.find_canaries(realistic, tenant_name, NOW + p * ROTATION))
                         for p in range(8))

    print(f"\nrealistic names among a tenant's decoys of the last two periods: {decoy_hits} of "
          f"{checks} checks ({decoy_hits / checks:.2%}); reported as canaries by a new process: "
          f"{cold_hits} ({cold_hits / checks:.3%}); by a process that saw them before: "
          f"{warm_hits}")
    assert cold_hits <= 0.005 * checks
    assert cold_hits < decoy_hits
    assert warm_hits == 0


def test_canary_recognises_decoy_names():
    factory = make_factory(known_tenants=["globex"])
    decoys = [decoy for key in range(40)
              for decoy in factory.decoys(TENANT, NOW, REAL_TOOLS, 3, key=bytes([key]))]
    canary = next(decoy for decoy in decoys
                  if factory.find_canaries([decoy], TENANT, NOW) == [decoy.name])
    restyled = ToolSpec(render_name(split_name(canary.name), "camel"))
    other_tenant = next(decoy for key in range(40)
                        for decoy in factory.decoys("globex", NOW, REAL_TOOLS, 3,
                                                    key=bytes([key]))
                        if factory.find_canaries([decoy], "globex", NOW))
    unknown_tenant = next(decoy for key in range(40)
                          for decoy in factory.decoys("initech", NOW, REAL_TOOLS, 3,
                                                      key=bytes([key]))
                          if factory.find_canaries([decoy], "initech", NOW)
                          and not factory.is_decoy(decoy.name, TENANT, NOW)
                          and not factory.is_decoy(decoy.name, "globex", NOW))

    assert not factory.is_canary(REAL_TOOLS, TENANT, NOW)
    assert factory.is_canary([*REAL_TOOLS, canary], TENANT, NOW)
    assert factory.find_canaries([*REAL_TOOLS, canary], TENANT, NOW) == [canary.name]
    assert factory.is_canary([restyled], TENANT, NOW)
    assert factory.is_canary([canary], TENANT, NOW + ROTATION)  # harvested last period
    assert not factory.is_canary([canary], TENANT, NOW + 2 * ROTATION)
    assert factory.is_canary([other_tenant], TENANT, NOW)  # a configured tenant's decoy
    assert not factory.is_canary([unknown_tenant], TENANT, NOW)


def test_mix_places_decoys_by_key():
    factory = make_factory()
    decoys = factory.decoys(TENANT, NOW, REAL_TOOLS, 3, key=b"q")
    patterns = set()
    for key in range(20):
        mixed = factory.mix(REAL_TOOLS, decoys, key=bytes([key]))
        assert mixed == factory.mix(REAL_TOOLS, decoys, key=bytes([key]))
        assert sorted(tool.name for tool in mixed) == sorted(
            tool.name for tool in [*REAL_TOOLS, *decoys])
        assert [tool for tool in mixed if tool.name in REAL_NAMES] == REAL_TOOLS
        patterns.add(tuple(index for index, tool in enumerate(mixed)
                           if tool.name not in REAL_NAMES))
    assert len(patterns) >= 15
    assert any(pattern[0] == 0 for pattern in patterns)
    assert any(pattern[-1] < len(REAL_TOOLS) for pattern in patterns)


def test_simulated_result_stable_per_query():
    factory = make_factory()
    decoy = factory.decoys(TENANT, NOW, REAL_TOOLS, 1, key=b"q")[0]
    arguments = {"account_id": "ACC-1", "amount": 25}
    first = factory.simulate_result(decoy, arguments, b"key-1", NOW)
    again = factory.simulate_result(decoy, arguments, b"key-1", NOW + 60)
    other = factory.simulate_result(decoy, arguments, b"key-2", NOW)

    assert first == again
    assert first != other
    assert first["account_id"] == "ACC-1"
    assert json.loads(json.dumps(first)) == first


# --- checks of the teacher's choice ---

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer"},
        "units": {"type": "string", "enum": ["metric", "imperial"]},
        "alerts": {"type": ["boolean", "null"]},
        "score": {"type": "number"},
    },
    "required": ["city"],
}


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({"city": "Oslo"}, None),
        ({"city": "Oslo", "days": 3, "units": "metric", "alerts": None, "score": 0.5}, None),
        ({"city": "Oslo", "days": 3.0}, None),
        ({"city": "Oslo", "extra": 1}, None),
        ([["city", "Oslo"]], "not a JSON object"),
        ({}, "required argument 'city' is missing"),
        ({"city": 5}, "'city' must be of type string"),
        ({"city": "Oslo", "days": "3"}, "'days' must be of type integer"),
        ({"city": "Oslo", "days": True}, "'days' must be of type integer"),
        ({"city": "Oslo", "days": 2.5}, "'days' must be of type integer"),
        ({"city": "Oslo", "score": float("nan")}, "'score' must be of type number"),
        ({"city": "Oslo", "units": "kelvin"}, "'units' is not one of its 2 allowed values"),
        ({"city": "Oslo", "alerts": "yes"}, "'alerts' must be of type boolean or null"),
    ],
)
def test_validate_arguments(arguments, problem):
    result = validate_arguments(SCHEMA, arguments)
    if problem is None:
        assert result is None
    else:
        assert problem in result
        assert "kelvin" not in result


def test_validate_arguments_closed_schema():
    closed = {**SCHEMA, "additionalProperties": False}
    assert "not a parameter" in validate_arguments(closed, {"city": "Oslo", "extra": 1})
    assert validate_arguments(None, {}) is None
    assert "takes no arguments" in validate_arguments(None, {"x": 1})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("send 250 dollars to \"savings\"",
         {"amount": 250, "to_account": "savings", "currency": "USD"}),
        ("transfer 12.5 EUR to my sister", {"amount": 12.5, "to_account":
                                            "transfer 12.5 EUR to my sister",
                                            "currency": "EUR"}),
        ("move money to savings", None),
    ],
)
def test_extract_arguments(text, expected):
    parameters = {"type": "object", "properties": {
        "amount": NUMBER, "to_account": STRING, "currency": STRING,
        "when": {"type": "string", "format": "date"}}, "required": ["amount", "to_account"]}
    assert extract_arguments(parameters, text) == expected


def test_extract_arguments_patterns():
    parameters = {"type": "object", "properties": {
        "date": {"type": "string", "format": "date"}, "time": STRING, "email": STRING,
        "units": {"type": "string", "enum": ["metric", "imperial"]}, "count": INTEGER,
        "notify": {"type": "boolean"}},
        "required": ["date", "time", "email", "units", "count", "notify"]}
    arguments = extract_arguments(
        parameters, "on 2024-05-01 at 7:30 pm mail ann@example.com 3 times in imperial")
    assert arguments == {"date": "2024-05-01", "time": "7:30 pm", "email": "ann@example.com",
                         "units": "imperial", "count": 3, "notify": False}


def test_map_arguments_to_real_tool():
    transfer = REAL_TOOLS[1]
    mapped = map_arguments({"amount": 40, "to_account": "DE89 3704", "memo": "rent"}, transfer,
                           "send it now")
    partial = map_arguments({"target_amount": 75.5}, transfer, "to \"Bob\"")
    missing = map_arguments({"memo": "rent"}, transfer, "send it now")

    assert mapped == {"amount": 40, "to_account": "DE89 3704"}
    assert partial == {"amount": 75.5, "to_account": "Bob"}
    assert missing is None


def test_most_similar_tool():
    decoy = ToolSpec("schedule_recurring_transfer", "Schedule a recurring transfer to a payee")
    unrelated = ToolSpec("open_garage_door", "Open the garage door")
    assert most_similar_tool(decoy, REAL_TOOLS, "x").name == "transfer_money"
    assert most_similar_tool(unrelated, REAL_TOOLS[:2], "x") is None


# --- routing a classifier's label to a tool ---


def clinc_labels() -> list[str]:
    require_clinc150()
    domains = json.loads((CLINC150_DIR / "domains.json").read_text(encoding="utf-8"))
    return sorted({label for labels in domains.values() for label in labels}) + ["oos"]


def test_router_maps_tools_to_intents():
    router = IntentToolRouter(clinc_labels())
    expected = {
        "balance": "get_account_balance",
        "transfer": "transfer_money",
        "pay_bill": "pay_bill",
        "book_flight": "book_flight",
        "exchange_rate": "get_exchange_rate",
        "weather": "get_weather_forecast",
        "alarm": "set_alarm",
        "timer": "set_timer",
        "translate": "translate_text",
    }
    text = 'from "Paris" to "Rome" for 5'
    for intent, name in expected.items():
        routed = router.route(text, intent, REAL_TOOLS, [])
        assert routed is not None, intent
        assert routed["name"] == name, intent
        assert validate_arguments(
            next(t for t in REAL_TOOLS if t.name == name).parameters, routed["arguments"]) is None
    assert router.route(text, "oos", REAL_TOOLS, []) is None
    assert router.route(text, "meaning_of_life", REAL_TOOLS, []) is None


def test_router_routes_labels():
    router = IntentToolRouter(["balance", "transfer", "recipe", "oos"])
    decoy = ToolSpec("search_quick_recipes", "Search quick recipes by keyword",
                     {"type": "object", "properties": {"query": STRING}, "required": ["query"]})
    other = ToolSpec("list_open_tasks", "List the open tasks of a team",
                     {"type": "object", "properties": {}})

    assert router.route("send 30 to \"bob\"", "transfer", REAL_TOOLS, [decoy]) == {
        "name": "transfer_money", "arguments": {"amount": 30, "to_account": "bob"}}
    # A real tool whose arguments are missing keeps the label.
    assert router.route("move money to bob", "transfer", REAL_TOOLS, [decoy]) is None
    # "recipe" is claimed by no real tool, so the decoy that covers it takes it.
    assert router.route("how do i make pancakes", "recipe", REAL_TOOLS, [other, decoy]) == {
        "name": "search_quick_recipes", "arguments": {"query": "how do i make pancakes"}}
    # Out of scope: the decoy sharing the most words with the query.
    assert router.route("the team kept its open tasks", "oos", REAL_TOOLS, [decoy, other]) == {
        "name": "list_open_tasks", "arguments": {}}
    assert router.route("the river flows north", "oos", REAL_TOOLS, [decoy, other]) is None


def test_router_prefers_tool_named_by_label():
    # Both tools cover the label "balance" fully; the one named by the label alone wins,
    # whatever their order and even when the query shares more words with the other.
    account = ToolSpec("balance", "Show the balance of a bank account",
                       {"type": "object", "properties": {}})
    bill = ToolSpec("bill_balance", "Show the balance left to pay on a bill",
                    {"type": "object", "properties": {}})
    router = IntentToolRouter(["balance", "bill_balance", "oos"])

    for tools in ([bill, account], [account, bill]):
        assert router.route("how much is left on my bill balance", "balance", tools, []) == {
            "name": "balance", "arguments": {}}
        assert router.route("what do i still owe on the bill", "bill_balance", tools, []) == {
            "name": "bill_balance", "arguments": {}}


def test_router_invalid_settings():
    with pytest.raises(ConfigError, match="labels"):
        IntentToolRouter([])
    with pytest.raises(ConfigError, match="min_coverage"):
        IntentToolRouter(["a"], min_coverage=0)


# --- the orchestrator with scripted teachers ---


def test_strategies_config_checked():
    with pytest.raises(ConfigError, match="cannot use 'return_decoy'"):
        make_orchestrator({"allow": "return_decoy"})
    with pytest.raises(ConfigError, match="unknown decoy strategy"):
        make_orchestrator({"allow": "ignore"})
    with pytest.raises(ConfigError, match="decoys_per_request"):
        make_orchestrator(decoys_per_request=9)
    with pytest.raises(ConfigError, match="max_retries"):
        make_orchestrator(max_retries=0)
    orchestrator = make_orchestrator({"allow": "force_real", "block": "return_decoy"})
    assert orchestrator.strategy_for("block") == "return_decoy"
    assert orchestrator.strategy_for("unheard-of") == "force_real"
    assert make_orchestrator({"block": "return_decoy"}).strategy_for("x") == "retry_masked"
    assert set(STRATEGIES) == {"retry_masked", "simulate", "force_real", "return_decoy"}


def test_real_choice_passes_unchanged():
    teacher = ScriptedTeacher(lambda text, tools, turn: call("set_timer", {"minutes": 5}))
    result = run(make_orchestrator().run("timer for 5 minutes", REAL_TOOLS, TENANT, "allow",
                                         teacher, "r1"))
    assert result.reply.tool_call == {"name": "set_timer", "arguments": {"minutes": 5}}
    assert result.action == "none"
    assert result.decoy_chosen is None
    assert result.retries == 0
    assert result.decoy_offered
    assert len(result.offered_decoys) == 3
    assert len(teacher.calls[0]) == len(REAL_TOOLS) + 3


def test_no_tools_no_decoys():
    teacher = ScriptedTeacher(lambda text, tools, turn: label("weather"))
    result = run(make_orchestrator().run("is it sunny", None, TENANT, "allow", teacher, "r1"))
    assert result.reply.label == "weather"
    assert not result.decoy_offered
    assert teacher.calls == [[]]


def test_retry_masked_ends_on_real_tool():
    def decoy_then_real(text, tools, turn):
        decoys = [tool for tool in tools if tool.name not in REAL_NAMES]
        return call(decoys[0].name) if len(decoys) == 3 else call("set_alarm", {"time": "7"})

    teacher = ScriptedTeacher(decoy_then_real)
    result = run(make_orchestrator().run("wake me at 7", REAL_TOOLS, TENANT, "allow", teacher,
                                         "r1"))
    assert result.reply.tool_call == {"name": "set_alarm", "arguments": {"time": "7"}}
    assert result.action == "retry_masked"
    assert result.retries == 1
    assert result.decoy_chosen in result.offered_decoys
    assert result.decoy_chosen in teacher.calls[0]
    assert result.decoy_chosen not in teacher.calls[1]
    assert len(teacher.calls[1]) == len(REAL_TOOLS) + 2


def test_retry_masked_bounded():
    teacher = ScriptedTeacher(always_decoy)
    result = run(make_orchestrator(max_retries=3).run("anything", REAL_TOOLS, TENANT, "allow",
                                                      teacher, "r1"))
    assert result.reply.label == "no_decoy_offered"
    assert result.retries == 3
    assert [len(names) for names in teacher.calls] == [15, 14, 13, 12]
    assert teacher.calls[-1] == [tool.name for tool in REAL_TOOLS]


def test_simulate_feeds_result_back():
    def choose(text, tools, turn):
        return call(first_decoy(tools).name, {"amount": 20}) if turn == 0 else call(
            "get_account_balance", {"account_type": "savings"})

    teacher = ScriptedToolLoopTeacher(choose)
    orchestrator = make_orchestrator()
    result = run(orchestrator.run("how much is in savings", REAL_TOOLS, TENANT, "degrade",
                                  teacher, "r1"))
    again = ScriptedToolLoopTeacher(choose)
    run(orchestrator.run("how much is in savings", REAL_TOOLS, TENANT, "degrade", again, "r2"))

    assert result.action == "simulate"
    assert result.reply.tool_call["name"] == "get_account_balance"
    assert result.retries == 1
    assert teacher.results[0]["amount"] == 20
    assert teacher.results == again.results  # the same query gets the same simulated result


def test_simulate_falls_back_without_second_turn():
    teacher = ScriptedTeacher(always_decoy)
    result = run(make_orchestrator().run("hello", REAL_TOOLS, TENANT, "degrade", teacher, "r1"))
    assert result.strategy == "simulate"
    assert result.action == "retry_masked"
    assert result.reply.label == "no_decoy_offered"


def test_simulate_decoy_again_falls_back():
    teacher = ScriptedToolLoopTeacher(always_decoy)
    result = run(make_orchestrator().run("hello", REAL_TOOLS, TENANT, "degrade", teacher, "r1"))
    assert result.action == "retry_masked"
    assert result.reply.label == "no_decoy_offered"
    assert len(teacher.results) == 1
    assert result.retries == 1 + 2


def test_force_real_replaces_decoy():
    orchestrator = make_orchestrator()
    queries = in_scope_queries(60, offset=2)
    forced = fallbacks = 0
    for index, text in enumerate(queries):
        chosen: dict[str, ToolSpec] = {}

        def choose(text, tools, turn, chosen=chosen):
            decoy = first_decoy(tools)
            if decoy is None:
                return label("no_decoy_offered")
            chosen[decoy.name] = decoy
            return call(decoy.name, extract_arguments(decoy.parameters, text, partial=True))

        result = run(orchestrator.run(text, REAL_TOOLS, TENANT, "suspect",
                                      ScriptedTeacher(choose), f"r{index}"))
        assert result.decoy_chosen in chosen
        if result.action == "force_real":
            forced += 1
            target = most_similar_tool(chosen[result.decoy_chosen], REAL_TOOLS, text)
            assert result.reply.tool_call["name"] == target.name
            assert validate_arguments(target.parameters, result.reply.tool_call["arguments"]) \
                is None
            assert result.retries == 0
        else:
            fallbacks += 1
            assert result.action == "retry_masked"
            assert result.reply.label == "no_decoy_offered"
    print(f"\nforce_real: {forced} of {len(queries)} decoy calls replaced by a real tool, "
          f"{fallbacks} fell back to retry_masked")
    assert forced >= 10


def test_return_decoy_reaches_blocked_client():
    teacher = ScriptedTeacher(always_decoy)
    result = run(make_orchestrator().run("anything", REAL_TOOLS, TENANT, "block", teacher, "r1"))
    assert result.action == "return_decoy"
    assert result.reply.tool_call["name"] == result.decoy_chosen
    assert make_factory().is_decoy(result.decoy_chosen, TENANT, NOW)
    assert result.retries == 0


@pytest.mark.parametrize("strategy", ["retry_masked", "simulate", "force_real"])
@pytest.mark.parametrize("teacher_class", [ScriptedTeacher, ScriptedToolLoopTeacher])
def test_honest_tier_never_receives_decoy(strategy, teacher_class):
    """A teacher that always calls a decoy, over varied queries: none reaches the client."""
    orchestrator = make_orchestrator({"allow": strategy, "block": "return_decoy"})
    queries = in_scope_queries(100, offset=3)
    decoys_received = decoys_chosen = 0
    for index, text in enumerate(queries):
        teacher = teacher_class(always_decoy)
        result = run(orchestrator.run(text, REAL_TOOLS, TENANT, "allow", teacher, f"r{index}"))
        decoys_chosen += result.decoy_chosen is not None
        tool_call = result.reply.tool_call
        decoys_received += tool_call is not None and tool_call["name"] not in REAL_NAMES
    assert decoys_chosen == len(queries)
    assert decoys_received == 0


def test_honest_guard_catches_decoy_in_text():
    def mentions_decoy(text, tools, turn):
        decoy = first_decoy(tools)
        if decoy is None:
            return label("clean")
        if turn == 0:
            return call(decoy.name)
        return TeacherReply(label=None, tool_call=None, text=f"I used {decoy.name}.", model="m")

    result = run(make_orchestrator({"allow": "simulate"}).run(
        "hello", REAL_TOOLS, TENANT, "allow", ScriptedToolLoopTeacher(mentions_decoy), "r1"))
    assert result.reply.label == "clean"
    assert result.retries == 2


def test_canary_reported_by_run():
    factory = make_factory()
    canary = next(decoy for key in range(40)
                  for decoy in factory.decoys(TENANT, NOW, REAL_TOOLS, 3, key=bytes([key]))
                  if factory.find_canaries([decoy], TENANT, NOW))
    teacher = ScriptedTeacher(lambda text, tools, turn: label("x"))
    result = run(make_orchestrator(factory=factory).run(
        "hi", [*REAL_TOOLS, canary], TENANT, "allow", teacher, "r1"))
    assert result.canaries == (canary.name,)
    assert canary.name not in result.offered_decoys


@pytest.mark.parametrize(
    ("reply", "phrase"),
    [
        (call("delete_everything", {}), "which is not among the 15 offered tools"),
        (call("set_timer", ["5"]), "not a JSON object"),
        (call("set_timer", {}), "required argument 'minutes' is missing"),
        (call("set_timer", {"minutes": "five"}), "'minutes' must be of type integer"),
        (call("get_account_balance", {"account_type": "gold"}), "allowed values"),
    ],
    ids=["unknown-tool", "arguments-not-object", "missing-required", "wrong-type", "enum"],
)
def test_invalid_choice_rejected(reply, phrase):
    teacher = ScriptedTeacher(lambda text, tools, turn: reply)
    with pytest.raises(BackendRejected) as info:
        run(make_orchestrator().run("set a timer", REAL_TOOLS, TENANT, "allow", teacher, "r1"))
    assert phrase in str(info.value)
    assert "five" not in str(info.value)


# --- the OpenAI-compatible teacher (fake server on loopback) ---


async def harvest(base_url: str, queries: Sequence[str], tier: str,
                  strategy_by_tier=None) -> list[Any]:
    orchestrator = make_orchestrator(strategy_by_tier)
    async with OpenAIToolLoopBackend(base_url, "teacher-llm") as backend:
        return [await orchestrator.run(text, REAL_TOOLS, TENANT, tier, backend, f"q{index}")
                for index, text in enumerate(queries)]


def describe_share(results: Sequence[Any]) -> tuple[int, int]:
    """Return (tool calls received, of which decoys)."""
    calls = [result.reply.tool_call for result in results if result.reply.tool_call]
    return len(calls), sum(call["name"] not in REAL_NAMES for call in calls)


@pytest.mark.slow
def test_honest_clients_openai_teacher():
    queries = in_scope_queries(300)
    with FakeOpenAIServer() as server:
        results = run(harvest(server.base_url, queries, "allow"))
    calls, decoys = describe_share(results)
    chosen = sum(result.decoy_chosen is not None for result in results)
    print(f"\nhonest tier, fake OpenAI teacher, {len(queries)} CLINC150 queries: teacher chose a "
          f"decoy {chosen} times; client received {calls} tool calls, {decoys} of them decoys")
    assert chosen >= 10  # decoys compete with the real tools
    assert decoys == 0
    assert all(result.action in ("none", "retry_masked") for result in results)


@pytest.mark.slow
def test_attacker_harvest_openai_teacher():
    wiki = wiki_sentences(300)
    in_scope = in_scope_queries(300, offset=7)
    with FakeOpenAIServer() as server:
        wiki_results = run(harvest(server.base_url, wiki, "block"))
        scope_results = run(harvest(server.base_url, in_scope, "block"))
    wiki_calls, wiki_decoys = describe_share(wiki_results)
    scope_calls, scope_decoys = describe_share(scope_results)
    total_calls, total_decoys = wiki_calls + scope_calls, wiki_decoys + scope_decoys
    print(f"\nattacker tier (return_decoy), fake OpenAI teacher: Wikipedia {wiki_decoys} decoys "
          f"of {wiki_calls} tool calls from {len(wiki)} sentences; CLINC150 {scope_decoys} of "
          f"{scope_calls} from {len(in_scope)} queries; together {total_decoys / total_calls:.1%}")
    assert wiki_decoys >= 0.1 * wiki_calls
    assert scope_decoys >= 0.05 * scope_calls
    assert total_decoys < total_calls


@pytest.mark.slow
def test_simulate_second_turn_openai_teacher():
    queries = in_scope_queries(150, offset=11)
    with FakeOpenAIServer(after_tool_result="other_tool") as server:
        results = run(harvest(server.base_url, queries, "allow", {"allow": "simulate"}))
        tool_messages = [message for request in server.requests
                         for message in request["messages"] if message["role"] == "tool"]
    simulated = [result for result in results if result.action == "simulate"]
    print(f"\nsimulate, fake OpenAI teacher: {len(simulated)} of {len(queries)} queries ended "
          "after a simulated decoy result")
    assert simulated
    assert len(tool_messages) >= len(simulated)
    assert all(isinstance(json.loads(message["content"]), dict) for message in tool_messages)
    for result in results:
        tool_call = result.reply.tool_call
        assert tool_call is None or tool_call["name"] in REAL_NAMES
        assert not any(name in (result.reply.text or "") for name in result.offered_decoys)


@pytest.mark.slow
def test_second_turn_request_format():
    tool_call = {"name": "get_weather_forecast", "arguments": {"city": "Oslo"}}
    with FakeOpenAIServer(after_tool_result="text") as server:
        async def second_turn():
            async with OpenAIToolLoopBackend(server.base_url, "teacher-llm") as backend:
                return await backend.predict_after_tool(
                    "weather in oslo", REAL_TOOLS, tool_call, {"forecast": "rain"}, "r1")

        reply = run(second_turn())
        messages = server.requests[-1]["messages"]

    assert [message["role"] for message in messages] == ["user", "assistant", "tool"]
    assistant_call = messages[1]["tool_calls"][0]
    assert assistant_call["function"] == {"name": "get_weather_forecast",
                                          "arguments": '{"city": "Oslo"}'}
    assert messages[2]["tool_call_id"] == assistant_call["id"]
    assert json.loads(messages[2]["content"]) == {"forecast": "rain"}
    assert reply.text == 'Here is the result: {"forecast": "rain"}'
    with pytest.raises(ValueError, match="after_tool_result"):
        FakeOpenAIServer(after_tool_result="answer")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("modes", "phrase"),
    [({"unknown_tool": True}, UNKNOWN_TOOL_NAME), ({"bad_tool_arguments": True},
                                                   "not a JSON object")],
    ids=["unknown-tool", "bad-arguments"],
)
def test_invalid_openai_choice_rejected(modes, phrase):
    with FakeOpenAIServer(**modes) as server:
        with pytest.raises(BackendRejected) as info:
            run(harvest(server.base_url, ["what is the weather in paris"], "allow"))
    assert phrase in str(info.value)


# --- the ONNX classifier teacher ---


TEACHER_PACKAGE = MODELS_DIR / "clinc150-teacher.edgepkg"


@pytest.mark.slow
def test_onnx_teacher_with_router():
    """The shipped 151-label CLINC150 teacher, with the intent router."""
    from edge_runtime.model import OnnxClassifier

    if not TEACHER_PACKAGE.is_file():
        pytest.skip(f"teacher package not found at {TEACHER_PACKAGE}")
    classifier = OnnxClassifier.from_file(str(TEACHER_PACKAGE), trust=demo_trust())
    backend = OnnxTeacherBackend(classifier)
    orchestrator = make_orchestrator(router=IntentToolRouter(classifier.labels))
    baseline = make_orchestrator(decoys_per_request=0,
                                 router=IntentToolRouter(classifier.labels))
    honest_queries = in_scope_queries(300, offset=5)
    wiki, in_scope = wiki_sentences(300), in_scope_queries(300, offset=9)

    async def ask_all(queries, tier, chosen_orchestrator=orchestrator):
        return [await chosen_orchestrator.run(text, REAL_TOOLS, TENANT, tier, backend, f"o{i}")
                for i, text in enumerate(queries)]

    honest = run(ask_all(honest_queries, "allow"))
    without_decoys = run(ask_all(honest_queries, "allow", baseline))
    wiki_results = run(ask_all(wiki, "block"))
    scope_results = run(ask_all(in_scope, "block"))
    honest_calls, honest_decoys = describe_share(honest)
    wiki_calls, wiki_decoys = describe_share(wiki_results)
    scope_calls, scope_decoys = describe_share(scope_results)
    weather = run(orchestrator.run("what's the weather in paris today", REAL_TOOLS, TENANT,
                                   "allow", backend, "w1"))
    print(f"\nONNX teacher with the intent router: honest tier {honest_decoys} decoys of "
          f"{honest_calls} tool calls from {len(honest_queries)} CLINC150 queries (teacher "
          f"chose a decoy {sum(r.decoy_chosen is not None for r in honest)} times); attacker "
          f"tier: Wikipedia {wiki_decoys} decoys of {wiki_calls} tool calls from {len(wiki)} "
          f"sentences, CLINC150 {scope_decoys} of {scope_calls} from {len(in_scope)} queries; "
          f"together {(wiki_decoys + scope_decoys) / (wiki_calls + scope_calls):.1%}")

    assert weather.reply.tool_call == {"name": "get_weather_forecast",
                                       "arguments": {"city": "what's the weather in paris today"}}
    assert honest_decoys == 0
    assert honest_calls > 0
    assert [r.reply for r in honest] == [r.reply for r in without_decoys]
    assert wiki_decoys >= 0.2 * wiki_calls
    assert scope_decoys >= 0.3 * scope_calls
    assert scope_decoys < scope_calls
