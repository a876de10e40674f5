"""Decoy tools: plausible tools that the service adds to a client's tool list and never runs.

A client sends the teacher its real tools. ``DecoyFactory`` makes a few decoys that look like
tools of the same application, and the orchestrator mixes them into the tool list sent to the
teacher.
When the teacher calls a decoy, the orchestrator retries, simulates or replaces the call for
honest clients, so only suspected extraction attackers receive decoy calls, and their
harvested (query, tool call) pairs are poisoned. A client that later sends a decoy's name in
its own tool list shows that it learned the name from such a harvest: that is a canary.

Decoys are derived from HMAC-SHA256(secret, tenant, rotation period). Each (tenant, period)
has a pool of ``POOL_PER_DOMAIN`` names per vocabulary domain, and the factory recognises a
decoy by recomputing the pools of the current and the previous period, so nothing is stored
beyond a bounded cache of recomputable pools. Names are built from a vocabulary of verbs,
objects, qualifiers and details in the style of real tool lists (``get_card_limits``,
``list_pending_transfers``), and each request's decoys copy its real tools' naming style,
namespace prefix and parameter counts.

Recognition recomputes pools from the secret and the vocabulary in this file, so every replica
must run the same vocabulary: a change to it makes the previous decoys unrecognisable.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from edge_runtime.errors import ConfigError
from edge_runtime.gateway.backends import TOOL_NAME_PATTERN, ToolSpec

POOL_PER_DOMAIN = 4  # decoy names per vocabulary domain, tenant and period
MAX_DECOYS = 8  # decoys one request can ask for
MAX_PARAMETERS = 6  # parameters of one decoy
MAX_NAME_WORDS = 5
PREFIX_WORDS = 2  # leading namespace words that recognition ignores, as in "acme_get_card"
# How much each word shared with the query multiplies a pool entry's chance to be offered.
QUERY_WEIGHT = 8.0
POOL_CACHE_SIZE = 4096  # (tenant, period) pools kept in memory; each is about 2 KB
KNOWN_NAMES_PER_TENANT = 512  # real tool names recorded per tenant for the canary check
KNOWN_TENANTS = 10_000  # tenants whose real tool names are recorded

# Words that carry no meaning for matching tools and queries.
STOP_WORDS = frozenset(
    "a an and are as at be by can do does for from given how i in is it its me my of on or "
    "please the their this to up user users what when which with you your".split()
)
# Verbs whose object is plural in a tool name: list_transactions, search_flights.
PLURAL_VERBS = frozenset("list search find recommend compare browse".split())
# Verbs that can take a detail noun after the object: get_order_status, update_card_limits.
DETAIL_VERBS = frozenset("get check update set view download".split())
# Synonyms that real tool lists use in place of "get", with the share of names using each.
GET_SYNONYMS = (("get", 0.76), ("fetch", 0.1), ("retrieve", 0.08), ("lookup", 0.06))


# --- vocabulary ---

# Each parameter: JSON type, description, and extra JSON Schema keywords.
_PARAMETERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # banking
    "account_id": ("string", "Identifier of the account", {}),
    "account_type": ("string", "Type of account",
                     {"enum": ["checking", "savings", "credit"]}),
    "amount": ("number", "Amount in the account currency", {}),
    "currency": ("string", "ISO 4217 currency code, such as EUR", {}),
    "start_date": ("string", "First day to include, as YYYY-MM-DD", {"format": "date"}),
    "end_date": ("string", "Last day to include, as YYYY-MM-DD", {"format": "date"}),
    "limit": ("integer", "Maximum number of results to return", {}),
    "from_account": ("string", "Account to take the money from", {}),
    "to_account": ("string", "Account number or IBAN that receives the money", {}),
    "transfer_date": ("string", "Day to execute the transfer, as YYYY-MM-DD",
                      {"format": "date"}),
    "payee_id": ("string", "Identifier of a saved payee", {}),
    "payee_name": ("string", "Name of the payee as shown on statements", {}),
    "payment_date": ("string", "Day to make the payment, as YYYY-MM-DD", {"format": "date"}),
    "iban": ("string", "International bank account number of the payee", {}),
    "card_id": ("string", "Identifier of the card", {}),
    "reason": ("string", "Reason given by the customer", {}),
    "month": ("integer", "Month number from 1 to 12", {}),
    "year": ("integer", "Four-digit year", {}),
    "format": ("string", "File format of the export", {"enum": ["pdf", "csv"]}),
    "frequency": ("string", "How often the order repeats",
                  {"enum": ["weekly", "monthly", "quarterly", "yearly"]}),
    "mandate_id": ("string", "Identifier of the direct debit mandate", {}),
    "loan_id": ("string", "Identifier of the loan", {}),
    "term_months": ("integer", "Length of the loan in months", {}),
    "goal_name": ("string", "Name of the savings goal", {}),
    "target_amount": ("number", "Amount to reach", {}),
    "target_date": ("string", "Day to reach the goal by, as YYYY-MM-DD", {"format": "date"}),
    "base_currency": ("string", "Currency to convert from, as an ISO 4217 code", {}),
    "target_currency": ("string", "Currency to convert to, as an ISO 4217 code", {}),
    "customer_id": ("string", "Identifier of the customer", {}),
    "category": ("string", "Spending category, such as groceries or travel", {}),
    # travel
    "origin": ("string", "City or IATA airport code to depart from", {}),
    "destination": ("string", "City or IATA airport code to arrive at", {}),
    "departure_date": ("string", "Day of departure, as YYYY-MM-DD", {"format": "date"}),
    "return_date": ("string", "Day of return, as YYYY-MM-DD", {"format": "date"}),
    "passengers": ("integer", "Number of passengers", {}),
    "cabin_class": ("string", "Cabin class",
                    {"enum": ["economy", "premium_economy", "business", "first"]}),
    "booking_reference": ("string", "Six-character booking reference", {}),
    "last_name": ("string", "Last name of the lead traveller", {}),
    "city": ("string", "Name of the city", {}),
    "check_in": ("string", "Check-in day, as YYYY-MM-DD", {"format": "date"}),
    "check_out": ("string", "Check-out day, as YYYY-MM-DD", {"format": "date"}),
    "guests": ("integer", "Number of guests", {}),
    "hotel_id": ("string", "Identifier of the hotel", {}),
    "seat_number": ("string", "Seat number, such as 14C", {}),
    "passenger_name": ("string", "Full name of the passenger", {}),
    "pickup_location": ("string", "Address or place of pickup", {}),
    "pickup_date": ("string", "Day of pickup, as YYYY-MM-DD", {"format": "date"}),
    "dropoff_location": ("string", "Address or place of drop-off", {}),
    "travel_date": ("string", "Day of travel, as YYYY-MM-DD", {"format": "date"}),
    "trip_id": ("string", "Identifier of the trip", {}),
    "nationality": ("string", "Nationality of the traveller, as an ISO 3166 country code", {}),
    "destination_country": ("string", "Country to visit, as an ISO 3166 country code", {}),
    "travelers": ("integer", "Number of travellers to cover", {}),
    "member_id": ("string", "Loyalty programme member number", {}),
    "points": ("integer", "Number of points", {}),
    "airport": ("string", "IATA airport code", {}),
    "pickup_time": ("string", "Pickup time in ISO 8601 format", {}),
    # home
    "device_id": ("string", "Identifier of the device", {}),
    "temperature": ("number", "Target temperature in degrees Celsius", {}),
    "mode": ("string", "Operating mode", {"enum": ["heat", "cool", "auto", "off"]}),
    "room": ("string", "Name of the room, such as kitchen", {}),
    "brightness": ("integer", "Brightness from 0 to 100", {}),
    "lock_id": ("string", "Identifier of the lock", {}),
    "time": ("string", "Time of day as HH:MM", {}),
    "label": ("string", "Short label to show", {}),
    "repeat_days": ("array", "Days of the week to repeat on",
                    {"items": {"type": "string"}}),
    "duration_minutes": ("integer", "Duration in minutes", {}),
    "text": ("string", "Text of the item", {}),
    "remind_at": ("string", "Date and time in ISO 8601 format", {}),
    "camera_id": ("string", "Identifier of the camera", {}),
    "scene_name": ("string", "Name of the scene", {}),
    "speaker_id": ("string", "Identifier of the speaker", {}),
    "volume": ("integer", "Volume from 0 to 100", {}),
    "door_id": ("string", "Identifier of the door", {}),
    "zone": ("integer", "Irrigation zone number", {}),
    "start_time": ("string", "Start time in ISO 8601 format", {}),
    "item_name": ("string", "Name of the item", {}),
    "quantity": ("integer", "Number of items", {}),
    # commerce
    "order_id": ("string", "Identifier of the order", {}),
    "tracking_number": ("string", "Carrier tracking number", {}),
    "carrier": ("string", "Name of the shipping carrier", {}),
    "product_id": ("string", "Identifier of the product", {}),
    "query": ("string", "Search terms", {}),
    "max_price": ("number", "Highest price to include", {}),
    "wishlist_id": ("string", "Identifier of the wishlist", {}),
    "coupon_code": ("string", "Coupon code as printed", {}),
    "cart_id": ("string", "Identifier of the shopping cart", {}),
    "invoice_id": ("string", "Identifier of the invoice", {}),
    "subscription_id": ("string", "Identifier of the subscription", {}),
    "plan": ("string", "Name of the plan", {"enum": ["basic", "standard", "premium"]}),
    "postcode": ("string", "Postal code", {}),
    "date": ("string", "Day, as YYYY-MM-DD", {"format": "date"}),
    "radius_km": ("number", "Search radius in kilometres", {}),
    "card_number": ("string", "Number printed on the card", {}),
    "target_price": ("number", "Price that triggers the alert", {}),
    # productivity
    "title": ("string", "Title", {}),
    "end_time": ("string", "End time in ISO 8601 format", {}),
    "attendees": ("array", "Email addresses of the attendees", {"items": {"type": "string"}}),
    "to": ("string", "Email address of the recipient", {}),
    "subject": ("string", "Subject line", {}),
    "body": ("string", "Body text", {}),
    "name": ("string", "Full name", {}),
    "email": ("string", "Email address", {}),
    "phone": ("string", "Phone number in E.164 format", {}),
    "due_date": ("string", "Due day, as YYYY-MM-DD", {"format": "date"}),
    "priority": ("string", "Priority", {"enum": ["low", "normal", "high"]}),
    "content": ("string", "Text content", {}),
    "document_id": ("string", "Identifier of the document", {}),
    "file_id": ("string", "Identifier of the file", {}),
    "folder_id": ("string", "Identifier of the folder", {}),
    "folder_name": ("string", "Name of the folder", {}),
    "parent_id": ("string", "Identifier of the parent folder", {}),
    "channel_id": ("string", "Identifier of the channel", {}),
    "report_id": ("string", "Identifier of the report", {}),
    "week_start": ("string", "Monday of the week, as YYYY-MM-DD", {"format": "date"}),
    "hours": ("number", "Hours worked", {}),
    # health
    "doctor_id": ("string", "Identifier of the doctor", {}),
    "prescription_id": ("string", "Identifier of the prescription", {}),
    "pharmacy_id": ("string", "Identifier of the pharmacy", {}),
    "test_id": ("string", "Identifier of the lab test", {}),
    "patient_id": ("string", "Identifier of the patient", {}),
    "specialty": ("string", "Medical specialty, such as dermatology", {}),
    "medication_name": ("string", "Name of the medication", {}),
    "dosage": ("string", "Dose to take, such as 200 mg", {}),
    "description": ("string", "Free-text description", {}),
    "severity": ("string", "Severity", {"enum": ["mild", "moderate", "severe"]}),
    "claim_id": ("string", "Identifier of the claim", {}),
    "activity_type": ("string", "Type of activity, such as running", {}),
    # media and local services
    "artist": ("string", "Name of the artist", {}),
    "playlist_name": ("string", "Name of the playlist", {}),
    "podcast_name": ("string", "Name of the podcast", {}),
    "episode_number": ("integer", "Episode number", {}),
    "topic": ("string", "Topic, such as sports or business", {}),
    "country": ("string", "Country as an ISO 3166 code", {}),
    "cuisine": ("string", "Type of cuisine, such as thai", {}),
    "max_minutes": ("integer", "Longest total time in minutes", {}),
    "price_range": ("string", "Price range", {"enum": ["$", "$$", "$$$"]}),
    "restaurant_id": ("string", "Identifier of the restaurant", {}),
    "party_size": ("integer", "Number of people", {}),
    "days": ("integer", "Number of days to cover", {}),
    "travel_mode": ("string", "Mode of travel",
                    {"enum": ["driving", "walking", "transit", "cycling"]}),
    "event_id": ("string", "Identifier of the event", {}),
    "symbol": ("string", "Ticker symbol", {}),
    "target_language": ("string", "Language to translate into, as an ISO 639-1 code", {}),
    # generic extras, used when a decoy needs more parameters than its object suggests
    "include_details": ("boolean", "Whether to include full details", {}),
    "language": ("string", "Language of the response, as an ISO 639-1 code", {}),
    "notes": ("string", "Optional notes", {}),
    "page_token": ("string", "Token of the page to return, from a previous call", {}),
}
_EXTRA_PARAMETERS = ("limit", "include_details", "language", "notes", "page_token")

# One line per object: singular | plural | verbs | details | qualifiers | parameters.
# Multi-word verbs use "_" (turn_on). Empty columns are allowed.
_DOMAIN_LINES: dict[str, str] = {
    "banking": """
        account | accounts | get list open close verify | details settings status |
            joint primary savings | account_id account_type
        balance | balances | get check | history | available current | account_id currency
        transaction | transactions | list search get dispute export categorize | details |
            recent pending international | account_id start_date end_date limit
        transfer | transfers | create schedule cancel get list | status details |
            scheduled pending recurring international | from_account to_account amount
            currency transfer_date
        payment | payments | make schedule cancel get list | status history |
            recurring upcoming pending | payee_id amount currency payment_date
        payee | payees | add remove list update verify | details | saved | payee_name iban
            account_id
        card | cards | freeze unfreeze block replace activate get list | limits settings status
            pin | virtual debit credit | card_id reason
        statement | statements | get download list email | | monthly annual | account_id month
            year format
        standing order | standing orders | create cancel update list get | details | | account_id
            amount frequency start_date
        direct debit | direct debits | cancel list get | details | active | account_id
            mandate_id
        loan | loans | apply_for get calculate list | balance schedule status | personal |
            loan_id amount term_months
        savings goal | savings goals | create update get list delete | progress | |
            goal_name target_amount target_date
        exchange rate | exchange rates | get list | history | live | base_currency
            target_currency
        credit score | credit scores | get check | history | | customer_id
        overdraft | overdrafts | request get cancel | limit status | arranged | account_id
            amount
        spending insight | spending insights | get list | summary | monthly | account_id
            month category
    """,
    "travel": """
        flight | flights | search book cancel get list | status details | return upcoming
            direct | origin destination departure_date passengers cabin_class
        booking | bookings | get cancel modify list confirm | details status | upcoming |
            booking_reference last_name
        hotel | hotels | search book get list | availability details | nearby | city
            check_in check_out guests
        hotel room | hotel rooms | book reserve cancel | availability | | hotel_id check_in
            check_out guests
        seat | seats | select change get | map | | booking_reference seat_number
        boarding pass | boarding passes | get send download | | mobile | booking_reference
            passenger_name
        baggage allowance | baggage allowances | get check | | | booking_reference
        car rental | car rentals | search book cancel get | details | | pickup_location
            pickup_date return_date
        train ticket | train tickets | search book cancel get | | return | origin destination
            travel_date passengers
        itinerary | itineraries | get create update share | details | | trip_id
        trip | trips | plan get list cancel | summary details | upcoming past | trip_id
            destination departure_date return_date
        visa requirement | visa requirements | get check | | | nationality
            destination_country
        travel insurance quote | travel insurance quotes | get compare | details | | trip_id
            travelers
        loyalty points | loyalty points | get redeem transfer | balance history | | member_id
            points
        airport transfer | airport transfers | book cancel get | | | airport pickup_time
            passengers
    """,
    "home": """
        thermostat | thermostats | set get adjust | temperature mode schedule | | device_id
            temperature mode
        light | lights | turn_on turn_off dim get | status brightness | | room brightness
        door lock | door locks | lock unlock get | status | front | lock_id
        alarm | alarms | set cancel list snooze update | | | time label repeat_days
        timer | timers | start stop cancel list get | | kitchen | duration_minutes label
        reminder | reminders | create delete list update get | | upcoming | text remind_at
        security camera | security cameras | get list arm disarm | snapshot status | | camera_id
        scene | scenes | activate create list delete | | saved | scene_name room
        speaker | speakers | get set group | volume | | speaker_id volume
        robot vacuum | robot vacuums | start stop schedule get | status | | room
        energy usage | energy usage | get | report history summary | daily monthly |
            start_date end_date
        garage door | garage doors | open close get | status | | door_id
        sprinkler schedule | sprinkler schedules | set get update cancel | | | zone start_time
            duration_minutes
        air purifier | air purifiers | turn_on turn_off set get | mode status | | device_id mode
        shopping list item | shopping list items | add remove list | | | item_name quantity
    """,
    "commerce": """
        order | orders | place cancel get list track return | status details history |
            recent open | order_id
        shipment | shipments | track get list | status | | tracking_number carrier
        return | returns | create start get list | status label | open | order_id reason
        refund | refunds | request get list | status | pending | order_id amount
        cart item | cart items | add remove update list | | | product_id quantity
        product | products | search get compare list | details reviews availability price |
            similar recommended | query category max_price
        wishlist | wishlists | get share create | items | | wishlist_id
        coupon | coupons | apply remove list validate | | available | coupon_code cart_id
        invoice | invoices | get download list send pay | | unpaid | invoice_id
        subscription | subscriptions | get cancel pause resume list upgrade | status details |
            active | subscription_id plan
        delivery slot | delivery slots | book list get | | available | postcode date
        store | stores | find list get | hours details | nearby | postcode radius_km
        gift card | gift cards | check buy redeem | balance | | card_number amount
        price alert | price alerts | create delete list | | active | product_id target_price
    """,
    "productivity": """
        calendar event | calendar events | create update delete list get | details | upcoming
            recurring | title start_time end_time attendees
        meeting | meetings | schedule cancel reschedule list get | details notes | upcoming |
            title start_time duration_minutes attendees
        email | emails | send search get list archive | | unread recent | to subject body
        contact | contacts | create search get update delete list | details | | name email
            phone
        task | tasks | create complete update delete list get | | overdue open | title
            due_date priority
        note | notes | create search get update delete list | | shared | title content
        document | documents | create share search get export | | shared recent | document_id
            format
        file | files | upload download share delete search list | metadata | shared recent |
            file_id folder_id
        folder | folders | create share list delete | contents | shared | folder_name
            parent_id
        channel message | channel messages | send pin list delete | | | channel_id text
        expense report | expense reports | create submit get list approve | status | pending |
            report_id amount category
        timesheet | timesheets | submit get update | | weekly | week_start hours
    """,
    "health": """
        appointment | appointments | book cancel reschedule list get | details | upcoming |
            doctor_id date time
        prescription | prescriptions | refill get list renew | status | active |
            prescription_id pharmacy_id
        lab result | lab results | get list download | | recent | test_id patient_id
        doctor | doctors | find search get list | availability | nearby | specialty city
        medication reminder | medication reminders | create delete list update | | daily |
            medication_name dosage remind_at
        step count | step counts | get | history summary | daily weekly | start_date end_date
        sleep record | sleep records | get list | summary | nightly | date
        heart rate | heart rates | get | history | resting | start_date end_date
        symptom | symptoms | check log list | | | description severity
        insurance claim | insurance claims | submit get list | status | open | claim_id amount
        pharmacy | pharmacies | find list | hours | nearby open | postcode
        workout | workouts | log get list start | summary history | recent | activity_type
            duration_minutes
    """,
    "media": """
        song | songs | play search queue get | lyrics details | similar | title artist
        playlist | playlists | create play get list update | tracks | shared | playlist_name
        podcast episode | podcast episodes | play search list download | | latest |
            podcast_name episode_number
        movie | movies | search get recommend | showtimes details | new | title city date
        news headline | news headlines | get list search | | top local | topic country
        recipe | recipes | search get save | ingredients details nutrition | quick |
            query cuisine max_minutes
        restaurant | restaurants | find search get | reviews hours details | nearby |
            city cuisine price_range
        table reservation | table reservations | make cancel get modify | details | |
            restaurant_id party_size date time
        weather forecast | weather forecasts | get | details | hourly daily | city days
        route | routes | get plan calculate | duration | fastest | origin destination
            travel_mode
        event ticket | event tickets | search buy get transfer | | available | event_id quantity
        translation | translations | get create | | | text target_language
        stock quote | stock quotes | get | history | live | symbol
        ride | rides | book request cancel get | status estimate | shared | pickup_location
            dropoff_location
    """,
}


@dataclass(frozen=True)
class _Subject:
    """An object that tools act on, with the words that can surround it in a tool name."""

    domain: str
    singular: tuple[str, ...]
    plural: tuple[str, ...]
    verbs: tuple[tuple[str, ...], ...]
    details: tuple[str, ...]
    qualifiers: tuple[str, ...]
    parameters: tuple[str, ...]


def _parse_domains() -> dict[str, tuple[_Subject, ...]]:
    domains: dict[str, tuple[_Subject, ...]] = {}
    for domain, block in _DOMAIN_LINES.items():
        # A line that starts with more indentation continues the previous entry.
        entries: list[str] = []
        for line in block.strip("\n").splitlines():
            if not line.strip():
                continue
            if entries and line.startswith(" " * 12):
                entries[-1] += " " + line.strip()
            else:
                entries.append(line.strip())
        subjects = []
        for entry in entries:
            columns = [column.split() for column in entry.split("|")]
            if len(columns) != 6:
                raise ValueError(f"decoy vocabulary entry {entry!r} needs 6 columns")
            singular, plural, verbs, details, qualifiers, parameters = columns
            unknown = [name for name in parameters if name not in _PARAMETERS]
            if unknown:
                raise ValueError(f"decoy vocabulary entry {entry!r} names unknown parameters "
                                 f"{unknown}")
            subjects.append(_Subject(
                domain=domain,
                singular=tuple(singular),
                plural=tuple(plural),
                verbs=tuple(tuple(verb.split("_")) for verb in verbs),
                details=tuple(details),
                qualifiers=tuple(qualifiers),
                parameters=tuple(parameters),
            ))
        domains[domain] = tuple(subjects)
    return domains


_DOMAINS = _parse_domains()
_VERB_WORDS = frozenset(
    word for subjects in _DOMAINS.values() for subject in subjects
    for verb in subject.verbs for word in verb
) | {word for word, _ in GET_SYNONYMS}


# --- words and keys ---


_NAME_WORD_PATTERN = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")


def split_name(name: str) -> tuple[str, ...]:
    """Split a tool or parameter name into lower-case words, whatever its style.

    ``get_card_limits``, ``getCardLimits``, ``GetCardLimits`` and ``get-card-limits`` all give
    ``("get", "card", "limits")``, and ``getATMLocations`` gives ``("get", "atm", "locations")``.
    """
    words: list[str] = []
    for chunk in re.split(r"[_\-\s.]+", name):
        words.extend(word.lower() for word in _NAME_WORD_PATTERN.findall(chunk))
    return tuple(words)


def _stem(word: str) -> str:
    """Reduce a plural to its singular form by suffix rules, enough to match tool words."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("sses", "shes", "ches", "xes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def content_words(text: str) -> frozenset[str]:
    """Return the stemmed words of ``text`` (a name or free text), without stop words."""
    words = []
    for token in re.findall(r"[A-Za-z0-9]+", text):
        words.extend(split_name(token))
    return frozenset(_stem(word) for word in words if len(word) > 1 and word not in STOP_WORDS)


# Words of each domain, for matching a request's real tools to the closest domains.
_DOMAIN_WORDS = {
    domain: frozenset(
        _stem(word)
        for subject in subjects
        for phrase in (*subject.singular, *subject.plural, *subject.details,
                       *subject.parameters)
        for word in phrase.split("_")
        if word not in STOP_WORDS
    )
    for domain, subjects in _DOMAINS.items()
}


def _derive(secret: bytes, *parts: str | bytes | int) -> bytes:
    """HMAC-SHA256 over the parts, each length-prefixed so that no two part lists collide."""
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for part in parts:
        if isinstance(part, bytes):
            data = part
        else:
            data = str(part).encode("utf-8", "surrogatepass")
        mac.update(len(data).to_bytes(4, "big"))
        mac.update(data)
    return mac.digest()


class KeyedStream:
    """Deterministic pseudo-random choices from a key: HMAC-SHA256 of the key and a counter.

    Unlike ``random.Random``, the sequence is fixed by this code alone, so every replica and
    Python version derives the same decoys from the same key.
    """

    def __init__(self, key: bytes):
        self._key = key
        self._counter = 0
        self._buffer = b""

    def next64(self) -> int:
        if len(self._buffer) < 8:
            self._buffer += hmac.new(self._key, self._counter.to_bytes(8, "big"),
                                     hashlib.sha256).digest()
            self._counter += 1
        value, self._buffer = self._buffer[:8], self._buffer[8:]
        return int.from_bytes(value, "big")

    def below(self, bound: int) -> int:
        """Return an integer in [0, bound), without modulo bias."""
        if bound < 1:
            raise ValueError(f"bound must be at least 1, got {bound}")
        limit = (1 << 64) - (1 << 64) % bound
        while True:
            value = self.next64()
            if value < limit:
                return value % bound

    def chance(self, probability: float) -> bool:
        return self.next64() < probability * float(1 << 64)

    def choice(self, items: Sequence[Any]) -> Any:
        return items[self.below(len(items))]

    def weighted_index(self, weights: Sequence[float]) -> int:
        total = sum(weights)
        if total <= 0:
            return self.below(len(weights))
        point = self.next64() / float(1 << 64) * total
        for index, weight in enumerate(weights):
            point -= weight
            if point < 0:
                return index
        return len(weights) - 1

    def shuffle(self, items: list[Any]) -> None:
        """Shuffle ``items`` in place (Fisher-Yates)."""
        for index in range(len(items) - 1, 0, -1):
            other = self.below(index + 1)
            items[index], items[other] = items[other], items[index]


# --- the shape of a request's real tools ---


@dataclass(frozen=True)
class ToolShape:
    """The naming style, prefix, parameter counts and domains of a request's real tools,
    which its decoys copy.

    ``style`` is the case of tool names (snake, camel, pascal or kebab), ``prefix`` the
    namespace words that every real name starts with, and ``parameter_counts`` the number of
    parameters of each real tool, which decoys draw from.
    """

    style: str = "snake"
    prefix: tuple[str, ...] = ()
    parameter_style: str = "snake"
    parameter_counts: tuple[int, ...] = (2,)
    required_share: float = 0.6
    word_counts: tuple[int, ...] = (3,)
    description_period: bool = False
    second_sentence_share: float = 0.0
    domain_weights: tuple[tuple[str, float], ...] = ()

    def domain_weight(self, domain: str) -> float:
        return dict(self.domain_weights).get(domain, 1.0)


def _name_style(name: str) -> str | None:
    """Return the case style of one name, or None when a one-word name fits several."""
    if "_" in name:
        return "snake"
    if "-" in name:
        return "kebab"
    if any(char.isupper() for char in name[1:]):
        return "pascal" if name[0].isupper() else "camel"
    return None


def shape_of(real_tools: Sequence[ToolSpec]) -> ToolShape:
    """Describe the naming style, prefix, parameter counts and domains of ``real_tools``."""
    if not real_tools:
        return ToolShape(domain_weights=tuple((domain, 1.0) for domain in _DOMAINS))

    styles = [style for style in (_name_style(tool.name) for tool in real_tools) if style]
    style = max(("snake", "camel", "pascal", "kebab"), key=styles.count) if styles else "snake"

    names = [split_name(tool.name) for tool in real_tools]
    prefix: tuple[str, ...] = ()
    first_words = {words[0] for words in names if words}
    if (len(real_tools) >= 2 and len(first_words) == 1 and all(len(w) >= 3 for w in names)
            and next(iter(first_words)) not in _VERB_WORDS):
        prefix = (next(iter(first_words)),)

    parameter_counts = []
    parameter_names = []
    required = 0
    for tool in real_tools:
        properties = (tool.parameters or {}).get("properties")
        properties = properties if isinstance(properties, Mapping) else {}
        parameter_counts.append(min(len(properties), MAX_PARAMETERS))
        parameter_names.extend(name for name in properties if isinstance(name, str))
        required_names = (tool.parameters or {}).get("required")
        if isinstance(required_names, list):
            required += len(required_names)
    total_parameters = sum(parameter_counts)
    camel = sum(1 for name in parameter_names if _name_style(name) in ("camel", "pascal"))
    snake = sum(1 for name in parameter_names if _name_style(name) == "snake")

    descriptions = [tool.description.strip() for tool in real_tools if tool.description.strip()]
    with_period = sum(description.endswith(".") for description in descriptions)
    with_two_sentences = sum(". " in description for description in descriptions)

    real_words: set[str] = set()
    for tool in real_tools:
        real_words |= content_words(f"{tool.name} {tool.description}")
    # A domain sharing no word with the real tools keeps a small weight, so that some decoys
    # come from neighbouring domains, as in a real application's mixed tool list.
    weights = tuple((domain, len(real_words & words) ** 2 + 0.25)
                    for domain, words in _DOMAIN_WORDS.items())

    return ToolShape(
        style=style,
        prefix=prefix,
        parameter_style="camel" if camel > snake else "snake",
        parameter_counts=tuple(parameter_counts),
        required_share=min(1.0, required / total_parameters) if total_parameters else 0.6,
        word_counts=tuple(max(1, len(words) - len(prefix)) for words in names),
        description_period=with_period * 2 > len(descriptions),
        second_sentence_share=with_two_sentences / len(descriptions) if descriptions else 0.0,
        domain_weights=weights,
    )


def render_name(words: Sequence[str], style: str) -> str:
    """Join lower-case words in a case style: snake, camel, pascal or kebab."""
    if style == "camel":
        return words[0] + "".join(word.capitalize() for word in words[1:])
    if style == "pascal":
        return "".join(word.capitalize() for word in words)
    if style == "kebab":
        return "-".join(words)
    return "_".join(words)


# --- pools and decoys ---


@dataclass(frozen=True)
class _PoolEntry:
    """One decoy of a (tenant, period) pool, before it is shaped to a request."""

    subject: _Subject
    verb: tuple[str, ...]
    qualifier: str | None
    detail: str | None
    plural: bool
    seed: bytes

    @property
    def distinctive(self) -> bool:
        """Whether real tools rarely have this name: it has a qualifier, a detail other than
        "details" or "status", or a synonym of "get", as in ``list_pending_transfers``."""
        return bool(self.qualifier or self.detail not in (None, "details", "status")
                    or self.verb[0] in ("fetch", "retrieve", "lookup"))

    @property
    def content_words(self) -> frozenset[str]:
        """Words of the name and of its object's details, to match a query against."""
        subject = self.subject
        return content_words(" ".join((*self.words, *subject.details, *subject.singular)))

    @property
    def words(self) -> tuple[str, ...]:
        obj = self.subject.plural if self.plural else self.subject.singular
        qualifier = (self.qualifier,) if self.qualifier else ()
        detail = (self.detail,) if self.detail else ()
        return (*self.verb, *qualifier, *obj, *detail)


class DecoyFactory:
    """Generate, recognise and place decoy tools for each tenant and rotation period.

    ``rotation_seconds`` is the length of a period. ``is_decoy`` recognises the decoys of the
    current and the previous period, so a name harvested just before a rotation still counts.
    ``known_tenants`` are the other tenants whose decoys ``find_canaries`` looks for, so its
    cost grows with their number. The factory is safe to share between threads and event
    loops.
    """

    def __init__(self, secret: bytes, rotation_seconds: int, *,
                 known_tenants: Iterable[str] = ()):
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise ConfigError("the decoy secret must be at least 16 random bytes; generate "
                              "one with os.urandom(32) and keep it out of the config file")
        if (not isinstance(rotation_seconds, int) or isinstance(rotation_seconds, bool)
                or rotation_seconds < 60):
            raise ConfigError(f"rotation_seconds must be an integer of at least 60, got "
                              f"{rotation_seconds!r}")
        self._secret = secret
        self.rotation_seconds = rotation_seconds
        self.known_tenants = tuple(dict.fromkeys(known_tenants))
        self._pools: OrderedDict[
            tuple[str, int], tuple[tuple[_PoolEntry, ...], frozenset[tuple[str, ...]]]
        ] = OrderedDict()
        self._known_names: OrderedDict[str, set[tuple[str, ...]]] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DecoyFactory(rotation_seconds={self.rotation_seconds})"

    def period(self, now: float) -> int:
        """Return the rotation period that the Unix time ``now`` falls in."""
        return math.floor(now / self.rotation_seconds)

    def query_key(self, tenant: str, now: float, text: str) -> bytes:
        """Return a key that is the same for the same tenant, period and normalised query."""
        normalised = " ".join(text.casefold().split())
        return _derive(self._secret, "query", tenant, self.period(now), normalised)

    # --- generation ---

    def pool_words(self, tenant: str, now: float) -> frozenset[tuple[str, ...]]:
        """Return the lower-case words of each decoy name of ``tenant`` in the period of
        ``now``, for audits: ``("list", "pending", "transfers")``."""
        return self._pool_words(tenant, self.period(now))

    def _pool(self, tenant: str, period: int) -> tuple[_PoolEntry, ...]:
        return self._cached_pool(tenant, period)[0]

    def _pool_words(self, tenant: str, period: int) -> frozenset[tuple[str, ...]]:
        return self._cached_pool(tenant, period)[1]

    def _cached_pool(self, tenant: str, period: int
                     ) -> tuple[tuple[_PoolEntry, ...], frozenset[tuple[str, ...]]]:
        with self._lock:
            cached = self._pools.get((tenant, period))
            if cached is not None:
                self._pools.move_to_end((tenant, period))
                return cached
        entries = self._generate_pool(tenant, period)
        cached = (entries, frozenset(entry.words for entry in entries))
        with self._lock:
            self._pools[(tenant, period)] = cached
            while len(self._pools) > POOL_CACHE_SIZE:
                self._pools.popitem(last=False)
        return cached

    def _generate_pool(self, tenant: str, period: int) -> tuple[_PoolEntry, ...]:
        entries: list[_PoolEntry] = []
        seen: set[tuple[str, ...]] = set()
        for domain, subjects in _DOMAINS.items():
            stream = KeyedStream(_derive(self._secret, "pool", tenant, period, domain))
            added = 0
            while added < POOL_PER_DOMAIN:
                entry = self._make_entry(stream, subjects)
                if entry.words in seen or len(entry.words) > MAX_NAME_WORDS:
                    continue
                seen.add(entry.words)
                entries.append(entry)
                added += 1
        return tuple(entries)

    @staticmethod
    def _make_entry(stream: KeyedStream, subjects: Sequence[_Subject]) -> _PoolEntry:
        subject = stream.choice(subjects)
        verb = stream.choice(subject.verbs)
        if verb == ("get",):
            verb = (GET_SYNONYMS[stream.weighted_index([w for _, w in GET_SYNONYMS])][0],)
        plural = verb[0] in PLURAL_VERBS
        qualifier = None
        if subject.qualifiers and stream.chance(0.3):
            qualifier = stream.choice(subject.qualifiers)
            # "get_recent_transactions" reads as naturally as "list_recent_transactions".
            if verb[0] in ("get", "fetch", "retrieve") and stream.chance(0.5):
                plural = True
        detail = None
        # A device is read or set through one of its properties: set_speaker_volume, not
        # set_speaker.
        detail_share = 1.0 if subject.domain == "home" else 0.5
        if (subject.details and not plural and verb[0] in DETAIL_VERBS | {"fetch", "retrieve",
                                                                          "lookup"}
                and stream.chance(detail_share)):
            detail = stream.choice(subject.details)
        return _PoolEntry(subject=subject, verb=verb, qualifier=qualifier, detail=detail,
                          plural=plural, seed=stream.next64().to_bytes(8, "big"))

    def decoys(self, tenant: str, now: float, real_tools: Sequence[ToolSpec], count: int,
               key: bytes = b"", query: str = "") -> list[ToolSpec]:
        """Return ``count`` decoys of this period for ``tenant``, shaped like ``real_tools``.

        Decoys from the real tools' domains, with names of similar length and sharing words
        with ``query``, are more likely. ``key`` varies the choice between requests (the
        orchestrator passes ``query_key``); the same arguments always give the same decoys.
        A pool entry whose words equal a real tool's words is skipped, so a decoy never
        shadows a real tool.
        """
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_DECOYS:
            raise ValueError(f"count must be an integer from 0 to {MAX_DECOYS}, got {count!r}")
        if count == 0:
            return []
        period = self.period(now)
        shape = shape_of(real_tools)
        real_names = {tool.name for tool in real_tools}
        real_words = {_strip_prefix(split_name(tool.name), shape.prefix) for tool in real_tools}
        candidates = [entry for entry in self._pool(tenant, period)
                      if entry.words not in real_words]

        query_words = content_words(query)
        stream = KeyedStream(_derive(self._secret, "select", tenant, period, key))
        chosen: list[ToolSpec] = []
        while candidates and len(chosen) < count:
            weights = [shape.domain_weight(entry.subject.domain)
                       * _length_weight(len(entry.words), shape.word_counts)
                       * (1 + QUERY_WEIGHT * len(query_words & entry.content_words))
                       for entry in candidates]
            entry = candidates.pop(stream.weighted_index(weights))
            tool = self._render(entry, shape, stream)
            if tool.name not in real_names:
                chosen.append(tool)
        return chosen

    def _render(self, entry: _PoolEntry, shape: ToolShape, stream: KeyedStream) -> ToolSpec:
        words = (*shape.prefix, *entry.words)
        name = render_name(words, shape.style)
        if len(name) > 64 or not TOOL_NAME_PATTERN.fullmatch(name):
            name = render_name(entry.words, shape.style)[:64]

        count = min(stream.choice(shape.parameter_counts), MAX_PARAMETERS)
        parameter_names = list(entry.subject.parameters)
        extras = list(_EXTRA_PARAMETERS)
        stream.shuffle(extras)
        parameter_names += [extra for extra in extras if extra not in parameter_names]
        parameter_names = parameter_names[:count]
        required_count = round(count * shape.required_share)
        if count and shape.required_share > 0:
            required_count = max(1, required_count)

        properties: dict[str, Any] = {}
        required: list[str] = []
        for index, canonical in enumerate(parameter_names):
            kind, description, extra = _PARAMETERS[canonical]
            rendered = render_name(canonical.split("_"), shape.parameter_style)
            properties[rendered] = {"type": kind, "description": description,
                                    **json.loads(json.dumps(extra))}
            if index < required_count:
                required.append(rendered)
        parameters: dict[str, Any] = {"type": "object", "properties": properties}
        if required:
            parameters["required"] = required

        description = _describe(entry, parameter_names, KeyedStream(entry.seed),
                                shape.second_sentence_share)
        if shape.description_period:
            description += "."
        return ToolSpec(name=name, description=description, parameters=parameters)

    # --- recognition ---

    def is_decoy(self, name: str, tenant: str, now: float) -> bool:
        """Return True when ``name`` is a decoy of ``tenant`` in this or the previous period.

        Case style and up to ``PREFIX_WORDS`` leading namespace words are ignored, so a decoy
        renamed to another style or prefix is still recognised.
        """
        return self._find_entry(name, tenant, now) is not None

    def _find_entry(self, name: str, tenant: str, now: float) -> _PoolEntry | None:
        words = split_name(name)
        period = self.period(now)
        for candidate_period in (period, period - 1):
            entries, pool_words = self._cached_pool(tenant, candidate_period)
            for start in range(0, min(PREFIX_WORDS, len(words) - 2) + 1):
                if words[start:] in pool_words:
                    return next(entry for entry in entries if entry.words == words[start:])
        return None

    def find_canaries(self, tools: Sequence[ToolSpec], tenant: str, now: float) -> list[str]:
        """Return the names in a client's tool list that reveal a harvested decoy.

        A name counts when it is a distinctive decoy (see ``_PoolEntry.distinctive``) of
        ``tenant`` or of a known tenant, in this or the previous period, and ``tenant`` never
        sent it while it was not a decoy. Every name that is not a decoy now is recorded as a
        real tool name of ``tenant`` for that check.

        Plain names such as ``set_alarm`` are real tool names too often to count. Without
        these two rules, about 2.5 % of the checks of a realistic real name found it among a
        tenant's decoys of the last two periods, as ``test_decoys.py`` measures.
        NOTE: the record lives in this process and holds ``KNOWN_NAMES_PER_TENANT`` names per
        tenant. A real name that coincides with a distinctive decoy is still reported when
        the process first gets it: in about 0.14 % of the checks in the same measurement.
        """
        tenants = (tenant, *(other for other in self.known_tenants if other != tenant))
        with self._lock:
            known = self._known_names.pop(tenant, set())
            self._known_names[tenant] = known
            while len(self._known_names) > KNOWN_TENANTS:
                self._known_names.popitem(last=False)

        canaries = []
        for tool in tools:
            words = split_name(tool.name)
            entries = [self._find_entry(tool.name, candidate, now) for candidate in tenants]
            if not any(entries):
                if len(known) < KNOWN_NAMES_PER_TENANT:
                    with self._lock:
                        known.add(words)
            elif words not in known and any(entry and entry.distinctive for entry in entries):
                canaries.append(tool.name)
        return canaries

    def is_canary(self, tools: Sequence[ToolSpec], tenant: str, now: float) -> bool:
        """Return True when a client's tool list names a decoy (see ``find_canaries``)."""
        return bool(self.find_canaries(tools, tenant, now))

    # --- placement and simulation ---

    def mix(self, real_tools: Sequence[ToolSpec], decoys: Sequence[ToolSpec],
            key: bytes) -> list[ToolSpec]:
        """Insert ``decoys`` among ``real_tools`` at positions derived from ``key``.

        The real tools keep their relative order. Without the secret, the positions cannot be
        predicted from the key.
        """
        stream = KeyedStream(_derive(self._secret, "mix", key))
        total = len(real_tools) + len(decoys)
        slots = list(range(total))
        stream.shuffle(slots)
        decoy_slots = set(slots[:len(decoys)])
        shuffled_decoys = list(decoys)
        stream.shuffle(shuffled_decoys)

        mixed: list[ToolSpec] = []
        real_iter, decoy_iter = iter(real_tools), iter(shuffled_decoys)
        for slot in range(total):
            mixed.append(next(decoy_iter) if slot in decoy_slots else next(real_iter))
        return mixed

    def simulate_result(self, decoy: ToolSpec, arguments: Mapping[str, Any], key: bytes,
                        now: float) -> dict[str, Any]:
        """Return a plausible JSON result for a call to ``decoy``, the same for the same key.

        The result echoes the call's scalar arguments and adds fields that fit the decoy's
        verb and object (an id for a created item, items for a list, an amount for a balance).
        Dates fall within a week of the current period's start.
        """
        stream = KeyedStream(_derive(self._secret, "simulate", decoy.name, key))
        words = split_name(decoy.name)
        verb = next((word for word in words if word in _VERB_WORDS), words[0] if words else "")
        base_day = datetime.fromtimestamp(self.period(now) * self.rotation_seconds,
                                          tz=timezone.utc).date()

        result: dict[str, Any] = {}
        for name, value in arguments.items():
            if isinstance(value, (str, int, float, bool)) and len(result) < 6:
                result[name] = value if not isinstance(value, str) else value[:80]

        def identifier() -> str:
            letters = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
            return "".join(stream.choice(letters) for _ in range(8))

        def day() -> str:
            return (base_day + timedelta(days=stream.below(7))).isoformat()

        if verb in PLURAL_VERBS or (len(words) > 1 and words[-1].endswith("s")
                                    and verb in ("get", "fetch", "retrieve")):
            items = [{"id": identifier(), "date": day()} for _ in range(1 + stream.below(3))]
            result["items"] = items
            result["total"] = len(items)
        elif verb in ("cancel", "delete", "remove", "close", "freeze", "block", "stop",
                      "disarm", "lock", "turn", "unfreeze", "unlock"):
            result["status"] = stream.choice(["cancelled", "done", "accepted"])
            result["updated_at"] = day()
        else:
            result["id"] = identifier()
            result["status"] = stream.choice(["confirmed", "active", "pending", "ok"])
            result["updated_at"] = day()
        if set(words) & {"balance", "balances", "amount", "price", "rate", "limit", "limits",
                         "quote", "score", "refund", "payment", "transfer", "loan"}:
            result.setdefault("amount", round(20 + stream.below(500_000) / 100, 2))
            result.setdefault("currency", "EUR")
        return result


def _strip_prefix(words: tuple[str, ...], prefix: tuple[str, ...]) -> tuple[str, ...]:
    if prefix and words[:len(prefix)] == prefix:
        return words[len(prefix):]
    return words


def _length_weight(length: int, real_lengths: Sequence[int]) -> float:
    """Weight a decoy name of ``length`` words by how many real names have a similar length."""
    close = sum(1 for real in real_lengths if real == length)
    near = sum(1 for real in real_lengths if abs(real - length) == 1)
    return 0.2 + close + 0.4 * near


# Qualifiers that take "the" rather than "a": "Get the latest podcast episode".
_DEFINITE_QUALIFIERS = frozenset("latest top live current primary front fastest".split())
# Description templates by verb. {a} is the object with its article, {the} with "the",
# {noun} bare, {nouns} plural, {detail} the detail noun, {Verb} the capitalised verb.
_VERB_TEMPLATES: dict[str, tuple[str, ...]] = {
    "get": ("Get {the}", "Get {the}", "Get the details of {a}", "Get {the} of a user"),
    "list": ("List {nouns}", "List the {nouns}", "List all {nouns}", "List {nouns} of a user"),
    "search": ("Search {nouns}", "Search for {nouns}", "Search {nouns} by keyword"),
    "find": ("Find {nouns}", "Find {nouns} for the user"),
    "create": ("Create a new {noun}", "Create {a}", "Create {a} for the user"),
    "add": ("Add {a}", "Add a new {noun}"),
    "cancel": ("Cancel {a}", "Cancel an existing {noun}", "Cancel {the}"),
    "delete": ("Delete {a}", "Remove {a}"),
    "remove": ("Remove {a}", "Remove {a} from the list"),
    "update": ("Update {a}", "Update an existing {noun}", "Change the details of {a}"),
    "set": ("Set {the}", "Change {the}"),
    "book": ("Book {a}", "Book {a} for the user"),
    "reserve": ("Reserve {a}", "Reserve {a} for given dates"),
    "schedule": ("Schedule {a}", "Schedule {a} for a future date"),
    "download": ("Download {a}", "Download {a} as a PDF"),
    "export": ("Export {nouns} to a CSV file", "Export {the}"),
    "send": ("Send {a}", "Send {a} to the user", "Send {the} by email"),
    "share": ("Share {a} with another person", "Share {a}"),
    "check": ("Check {the}", "Check whether {a} is available"),
    "verify": ("Verify {a}", "Verify the details of {a}"),
    "play": ("Play {a}", "Start playing {a}"),
    "track": ("Track {a}", "Track the delivery of {a}"),
    "turn on": ("Turn on {the}", "Switch on {the}"),
    "turn off": ("Turn off {the}", "Switch off {the}"),
    "freeze": ("Freeze {a} temporarily", "Freeze {a}"),
    "unfreeze": ("Unfreeze {a}", "Unfreeze a frozen {noun}"),
    "block": ("Block {a} immediately", "Block {a}"),
    "replace": ("Replace a lost or damaged {noun}", "Order a replacement {noun}"),
    "complete": ("Mark {a} as complete", "Complete {a}"),
    "calculate": ("Calculate {the}", "Estimate {the}"),
    "compare": ("Compare {nouns}", "Compare {nouns} across providers"),
    "recommend": ("Recommend {nouns}", "Recommend {nouns} to the user"),
    "request": ("Request {a}", "Submit a request for {a}"),
    "submit": ("Submit {a}", "Submit {a} for approval"),
    "pay": ("Pay {a}", "Pay an outstanding {noun}"),
    "redeem": ("Redeem {the}", "Redeem {a}"),
    "refill": ("Refill {a}", "Request a refill of {a}"),
    "start": ("Start {the}", "Start {a}"),
    "stop": ("Stop {the}", "Stop {a}"),
}
_DEFAULT_TEMPLATES = ("{Verb} {a}", "{Verb} {a}", "{Verb} {the}")
_DETAIL_TEMPLATES = ("{Verb} the {detail} of {a}", "{Verb} the {detail} of {a}",
                     "{Verb} the current {detail} of {a}", "{Verb} the {noun} {detail}")
# Phrases that name a parameter in a description: "Search hotels by city and check-in date".
_PARAMETER_PHRASES = {
    "city": "city", "check_in": "check-in date", "departure_date": "date", "date": "date",
    "query": "keyword", "cuisine": "cuisine", "specialty": "specialty", "category": "category",
    "topic": "topic", "artist": "artist", "title": "title", "postcode": "postcode",
    "price_range": "price range", "max_price": "price", "name": "name", "email": "email",
    "travel_date": "date", "destination": "destination", "origin": "origin",
    "activity_type": "activity", "account_type": "account type", "status": "status",
}
# A phrase that a description may end with when the decoy has this parameter, unless the
# phrase's noun is already the tool's object.
_PARAMETER_TAILS = (
    ("account_id", " for an account", "account"),
    ("city", " in a city", "city"),
    ("booking_reference", " for a booking", "booking"),
    ("order_id", " for an order", "order"),
    ("room", " in a room", "room"),
    ("trip_id", " for a trip", "trip"),
    ("doctor_id", " with a doctor", "doctor"),
    ("restaurant_id", " at a restaurant", "restaurant"),
    ("patient_id", " for a patient", "patient"),
    ("customer_id", " for a customer", "customer"),
    ("date", " on a given date", "date"),
    ("postcode", " near a postcode", "postcode"),
    ("amount", " for a given amount", "amount"),
    ("card_id", " on a card", "card"),
)
# Endings for a description when no parameter suggests one, by domain.
_DOMAIN_TAILS: dict[str, tuple[tuple[str, str], ...]] = {
    "banking": ((" for a bank account", "account"), (" for a customer", "customer")),
    "travel": ((" for a trip", "trip"), (" for a passenger", "passenger")),
    "home": ((" in the house", "house"), (" in a room", "room")),
    "commerce": ((" for a customer", "customer"), (" in the store", "store")),
    "productivity": ((" for a user", "user"), (" for a team", "team")),
    "health": ((" for a patient", "patient"),),
    "media": ((" for a user", "user"), (" near a location", "location")),
}
_SECOND_SENTENCES = (
    "Requires the user to be signed in.",
    "Use this when the user asks to {verb} {a}.",
    "Returns an error if it does not exist.",
)
_PLURAL_SECOND_SENTENCES = (
    "Results are sorted newest first.",
    "Returns at most 50 results.",
)


def _describe(entry: _PoolEntry, parameter_names: Sequence[str], stream: KeyedStream,
              second_sentence_share: float) -> str:
    """Write a description in the style of real tool descriptions, without a final period.

    ``second_sentence_share`` is the probability of a second sentence, such as "Returns at
    most 50 results".
    """
    verb = " ".join(entry.verb)
    verb_text = {"fetch": "Fetch", "retrieve": "Retrieve", "lookup": "Look up"}.get(
        verb, verb.capitalize())
    singular = " ".join(entry.subject.singular)
    plural = " ".join(entry.subject.plural)
    qualifier = f"{entry.qualifier} " if entry.qualifier else ""
    noun = qualifier + (plural if entry.plural else singular)
    if entry.plural:
        article = "the" if entry.qualifier in _DEFINITE_QUALIFIERS else ""
    else:
        article = ("the" if entry.qualifier in _DEFINITE_QUALIFIERS
                   else "an" if noun[:1] in "aeiou" else "a")
    values = {
        "Verb": verb_text,
        "verb": verb_text.lower(),
        "noun": noun,
        "nouns": qualifier + plural,
        "a": f"{article} {noun}".strip(),
        "the": f"the {noun}",
        "detail": entry.detail or "",
    }

    if entry.detail:
        templates = _DETAIL_TEMPLATES
    else:
        key = "get" if verb in ("fetch", "retrieve", "lookup") else verb
        templates = _VERB_TEMPLATES.get(key, _DEFAULT_TEMPLATES)
        if key == "get" and entry.plural:
            templates = _VERB_TEMPLATES["list"]
    text = stream.choice(templates).format(**values)
    if verb in ("fetch", "retrieve", "lookup") and text.startswith("Get "):
        text = f"{verb_text} {text[4:]}"

    subject_words = set(entry.subject.singular) | set(entry.subject.plural)
    phrases = [_PARAMETER_PHRASES[name] for name in parameter_names
               if name in _PARAMETER_PHRASES]
    if {"origin", "destination"} <= set(parameter_names):
        text += stream.choice([" between two places", " from an origin to a destination"])
    elif entry.plural and phrases and stream.chance(0.7):
        text += " by " + " and ".join(phrases[:2])
    else:
        tails = [tail for name, tail, word in _PARAMETER_TAILS
                 if name in parameter_names and word not in subject_words]
        if {"start_date", "end_date"} <= set(parameter_names):
            tails.append(" over a date range")
        if not tails:
            tails = [tail for tail, word in _DOMAIN_TAILS[entry.subject.domain]
                     if word not in subject_words]
        if tails and stream.chance(0.5):
            text += stream.choice(tails)

    if stream.chance(second_sentence_share):
        sentences = _PLURAL_SECOND_SENTENCES if entry.plural else _SECOND_SENTENCES
        text += ". " + stream.choice(sentences).format(**values).rstrip(".")
    return text
